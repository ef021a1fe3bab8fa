//! Image quality metrics (PSNR, SSIM as BasicSR computes them).
