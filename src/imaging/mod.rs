//! Image work before and after the model: loading/saving, resizing, colour correction.

pub mod colorfix;
pub mod io;
pub mod resize;
