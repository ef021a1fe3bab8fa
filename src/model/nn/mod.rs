//! The layers the networks are made of (norms, linear, convolution) with their parameters and
//! checkpoint paths; what they compute, and which implementation runs, is
//! [`crate::kernels`]'. See [`Conv2d`] and [`Linear`] for how a frozen or trained layer chooses its backward.

mod layers;

pub use layers::{
    conv2d, group_norm32, linear, linear_no_bias, Conv2d, ConvSpec, GroupNorm, LayerNorm, Linear,
};
