//! Image decoding and the restore pre-processing of one image: decode with a pixel limit, plan
//! the sizes, convert to a tensor, upscale (bicubic, as the reference) and reflect-pad.
#![no_main]

use libfuzzer_sys::fuzz_target;
use pfstorer::imaging::io::decode_image_within;
use pfstorer::restore::{
    image_to_tensor, pad_reflect_to_multiple, resize_bicubic_nchw, RestoreSettings, TargetSize,
};

/// Small enough that one execution stays fast; the limit logic is what is under test.
const MAX_PIXELS: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    // The first byte picks the target size, the rest is the file.
    let Some((&pick, bytes)) = data.split_first() else {
        return;
    };
    let Ok(loaded) = decode_image_within(bytes, MAX_PIXELS) else {
        return;
    };
    assert_eq!(
        loaded.rgb.data.len(),
        loaded.width() * loaded.height() * 3,
        "decoded buffer matches its size"
    );
    let target = match pick % 3 {
        0 => TargetSize::Scale(1.0 + (pick / 3) as f64 / 16.0),
        1 => TargetSize::LongSide(1 + pick as usize * 4),
        _ => TargetSize::Size(1 + pick as usize, 1 + (pick as usize * 7) % 300),
    };
    let settings = RestoreSettings {
        max_pixels: MAX_PIXELS,
        ..RestoreSettings::default()
    };
    let Ok(plan) = settings.plan(64, loaded.width(), loaded.height(), target) else {
        return;
    };
    assert!(plan.padded_w * plan.padded_h <= MAX_PIXELS);
    let device = candle_core::Device::Cpu;
    let lq = image_to_tensor(&loaded.rgb, &device).expect("RGB to tensor");
    let lq = resize_bicubic_nchw(&lq, plan.proc_h, plan.proc_w).expect("resize");
    if let Ok(padded) = pad_reflect_to_multiple(&lq, 32) {
        let (_, _, h, w) = padded.dims4().unwrap();
        assert_eq!((h, w), (plan.padded_h, plan.padded_w));
    }
});
