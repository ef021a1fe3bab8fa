//! Loading and saving images for every subcommand.
//!
//! Loading decodes JPEG, PNG, WebP, BMP and TIFF (8 or 16 bit, gray or colour, with or without
//! alpha), applies the EXIF orientation and returns float RGB in [0, 1] plus the alpha plane.
//! Saving is atomic (a temporary file in the target directory, then a rename), refuses to replace
//! an existing file unless asked to, and produces the same bytes for the same input.

use super::ImageF32;
use crate::error::{Error, Result};
use image::{DynamicImage, ImageDecoder, ImageError, ImageFormat, ImageReader};
use std::io::Cursor;
use std::path::Path;

/// A decoded image: colour as RGB, the alpha plane apart.
#[derive(Debug, Clone, PartialEq)]
pub struct LoadedImage {
    /// Three channels, RGB, in [0, 1]; gray sources are replicated into all three.
    pub rgb: ImageF32,
    /// One channel in [0, 1], when the source had an alpha channel.
    pub alpha: Option<ImageF32>,
    /// Bits per sample of the source (8 or 16; float sources count as 16).
    pub bit_depth: u8,
    /// The source was grayscale.
    pub gray: bool,
}

impl LoadedImage {
    pub fn width(&self) -> usize {
        self.rgb.width
    }

    pub fn height(&self) -> usize {
        self.rgb.height
    }
}

/// File extensions (lower case) that [`load_image`] is meant for.
pub const IMAGE_EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff"];

/// Whether `path` has one of [`IMAGE_EXTENSIONS`] (case-insensitive).
pub fn has_image_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .map(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
        .unwrap_or(false)
}

/// Most pixels an input image may have by default (decoded as f32 RGB + alpha: 16 bytes each,
/// so about 1 GB): `pfstorer restore --max-megapixels` changes it for restoring.
pub const DEFAULT_MAX_INPUT_PIXELS: usize = 64_000_000;

/// Largest input file read, in bytes (1 GiB): far above any photo (a 64-megapixel 16-bit RGBA
/// TIFF without compression is 512 MB), and a bound on what `/dev/zero` or a huge file can take.
pub const MAX_INPUT_FILE_BYTES: u64 = 1 << 30;

/// The bytes of an input file: only a regular file (a FIFO would block, a device never ends),
/// at most [`MAX_INPUT_FILE_BYTES`] and at most its size as it was when opened.
pub fn read_input_file(path: &Path) -> Result<Vec<u8>> {
    use std::io::Read;
    let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
    if !meta.is_file() {
        return Err(input_error(
            path,
            "not a regular file (a directory, FIFO, device or socket)",
        ));
    }
    if meta.len() > MAX_INPUT_FILE_BYTES {
        return Err(input_error(
            path,
            &format!(
                "file of {} bytes is larger than the {} bytes (1 GiB) an input may have",
                meta.len(),
                MAX_INPUT_FILE_BYTES
            ),
        ));
    }
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // Checked again on the open file: the name may have been swapped since.
    let open_meta = file.metadata().map_err(|e| Error::io(path, e))?;
    if !open_meta.is_file() {
        return Err(input_error(path, "not a regular file"));
    }
    let limit = open_meta.len().min(MAX_INPUT_FILE_BYTES);
    let mut bytes = Vec::with_capacity(limit as usize);
    file.take(limit)
        .read_to_end(&mut bytes)
        .map_err(|e| Error::io(path, e))?;
    Ok(bytes)
}

/// Reads and decodes an image file; see [`LoadedImage`].
pub fn load_image(path: impl AsRef<Path>) -> Result<LoadedImage> {
    load_image_with_min_size(path, 1)
}

/// As [`load_image`], and fails when either side (after orientation) is below `min_side`.
pub fn load_image_with_min_size(path: impl AsRef<Path>, min_side: usize) -> Result<LoadedImage> {
    load_image_within(path, min_side, DEFAULT_MAX_INPUT_PIXELS)
}

/// As [`load_image_with_min_size`], refusing before decoding an image of more than
/// `max_pixels` pixels (by its header) or one whose decoder would allocate more than that
/// many 16-bit RGBA pixels.
pub fn load_image_within(
    path: impl AsRef<Path>,
    min_side: usize,
    max_pixels: usize,
) -> Result<LoadedImage> {
    let path = path.as_ref();
    let bytes = read_input_file(path)?;
    let loaded = decode_image_within(&bytes, max_pixels).map_err(|msg| input_error(path, &msg))?;
    if loaded.width() < min_side || loaded.height() < min_side {
        return Err(input_error(
            path,
            &format!(
                "image is {}x{}; at least {min_side}x{min_side} needed",
                loaded.width(),
                loaded.height()
            ),
        ));
    }
    Ok(loaded)
}

/// Decodes an in-memory image within [`DEFAULT_MAX_INPUT_PIXELS`]. The error is a short
/// description without the file name.
pub fn decode_image(bytes: &[u8]) -> std::result::Result<LoadedImage, String> {
    decode_image_within(bytes, DEFAULT_MAX_INPUT_PIXELS)
}

/// [`decode_image`] with a pixel limit (see [`load_image_within`]).
pub fn decode_image_within(
    bytes: &[u8],
    max_pixels: usize,
) -> std::result::Result<LoadedImage, String> {
    let mut reader = ImageReader::new(Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| format!("cannot read ({e})"))?;
    // The decoder's own allocations (frames, 16-bit RGBA at most) stay within the limit too.
    let mut limits = image::Limits::default();
    limits.max_alloc = Some((max_pixels as u64).saturating_mul(8));
    reader.limits(limits);
    let format = reader
        .format()
        .ok_or_else(|| "not an image (unrecognised format)".to_string())?;
    let name = format_name(format);
    if format == ImageFormat::Jpeg {
        check_jpeg_complete(bytes).map_err(|why| format!("truncated or corrupt JPEG ({why})"))?;
    }
    let mut decoder = reader
        .into_decoder()
        .map_err(|e| describe_decode_error(name, e))?;
    let (w, h) = decoder.dimensions();
    let pixels = w as u64 * h as u64;
    if pixels > max_pixels as u64 {
        return Err(format!(
            "{name} of {w}x{h} pixels ({:.0} MP) is larger than the limit of {:.0} MP (pfstorer restore: --max-megapixels)",
            pixels as f64 / 1e6,
            max_pixels as f64 / 1e6
        ));
    }
    // A broken EXIF block should not make an otherwise good image unreadable.
    let orientation = decoder
        .orientation()
        .unwrap_or(image::metadata::Orientation::NoTransforms);
    let mut image =
        DynamicImage::from_decoder(decoder).map_err(|e| describe_decode_error(name, e))?;
    image.apply_orientation(orientation);
    Ok(split_dynamic(image))
}

fn input_error(path: &Path, message: &str) -> Error {
    Error::Input(format!("{}: {message}", path.display()))
}

fn format_name(format: ImageFormat) -> &'static str {
    match format {
        ImageFormat::Jpeg => "JPEG",
        ImageFormat::Png => "PNG",
        ImageFormat::WebP => "WebP",
        ImageFormat::Bmp => "BMP",
        ImageFormat::Tiff => "TIFF",
        ImageFormat::Gif => "GIF",
        _ => "image",
    }
}

fn describe_decode_error(format: &str, err: ImageError) -> String {
    match err {
        ImageError::Unsupported(e) => format!("unsupported {format} ({e})"),
        ImageError::Limits(e) => format!("{format} too large ({e})"),
        other => format!("truncated or corrupt {format} ({other})"),
    }
}

/// The JPEG decoder tolerates missing data (it fills the rest with gray), so a cut-off file
/// would load silently. Walk the marker segments to the first scan and require an
/// end-of-image marker after it; entropy-coded data stuffs 0xFF bytes, so 0xFFD9 there is real.
fn check_jpeg_complete(bytes: &[u8]) -> std::result::Result<(), &'static str> {
    let mut pos = 2; // after SOI
    loop {
        if pos + 4 > bytes.len() {
            return Err("file ends inside the header");
        }
        if bytes[pos] != 0xFF {
            return Err("bad marker in the header");
        }
        let marker = bytes[pos + 1];
        if marker == 0xFF {
            pos += 1; // fill byte
            continue;
        }
        if marker == 0xD8 || marker == 0x01 || (0xD0..=0xD7).contains(&marker) {
            pos += 2;
            continue;
        }
        let len = u16::from_be_bytes([bytes[pos + 2], bytes[pos + 3]]) as usize;
        if marker == 0xDA {
            pos += 2 + len;
            break;
        }
        pos += 2 + len;
    }
    if pos > bytes.len() {
        return Err("file ends inside the scan header");
    }
    if bytes[pos..].windows(2).any(|w| w == [0xFF, 0xD9]) {
        Ok(())
    } else {
        Err("no end-of-image marker; the file is cut off")
    }
}

fn split_dynamic(image: DynamicImage) -> LoadedImage {
    use DynamicImage as D;
    let (width, height) = (image.width() as usize, image.height() as usize);
    let gray = matches!(
        image,
        D::ImageLuma8(_) | D::ImageLumaA8(_) | D::ImageLuma16(_) | D::ImageLumaA16(_)
    );
    let has_alpha = image.color().has_alpha();
    let (bit_depth, samples): (u8, Vec<f32>) = match image {
        D::ImageLuma8(_) | D::ImageLumaA8(_) | D::ImageRgb8(_) | D::ImageRgba8(_) => {
            let buf = if has_alpha {
                image.to_rgba8().into_raw()
            } else {
                image.to_rgb8().into_raw()
            };
            (8, buf.into_iter().map(|v| v as f32 / 255.0).collect())
        }
        D::ImageLuma16(_) | D::ImageLumaA16(_) | D::ImageRgb16(_) | D::ImageRgba16(_) => {
            let buf = if has_alpha {
                image.to_rgba16().into_raw()
            } else {
                image.to_rgb16().into_raw()
            };
            (16, buf.into_iter().map(|v| v as f32 / 65535.0).collect())
        }
        _ => {
            let buf = if has_alpha {
                image.to_rgba32f().into_raw()
            } else {
                image.to_rgb32f().into_raw()
            };
            (16, buf.into_iter().map(|v| v.clamp(0.0, 1.0)).collect())
        }
    };
    let channels = if has_alpha { 4 } else { 3 };
    let pixels = width * height;
    let mut rgb = Vec::with_capacity(pixels * 3);
    let mut alpha = Vec::with_capacity(if has_alpha { pixels } else { 0 });
    for px in samples.chunks_exact(channels) {
        rgb.extend_from_slice(&px[..3]);
        if has_alpha {
            alpha.push(px[3]);
        }
    }
    LoadedImage {
        rgb: ImageF32::new(width, height, 3, rgb),
        alpha: has_alpha.then(|| ImageF32::new(width, height, 1, alpha)),
        bit_depth,
        gray,
    }
}

/// Float [0, 1] to 8 bit: clamp, scale, round half to even (as numpy/torch/OpenCV round).
pub fn quantize_u8(v: f32) -> u8 {
    (v.clamp(0.0, 1.0) * 255.0).round_ties_even() as u8
}

/// Float [0, 1] to 16 bit, same rounding as [`quantize_u8`].
pub fn quantize_u16(v: f32) -> u16 {
    (v.clamp(0.0, 1.0) * 65535.0).round_ties_even() as u16
}

/// Interleaves colour (1 or 3 channels) and an optional alpha plane into samples.
fn interleave(rgb: &ImageF32, alpha: Option<&ImageF32>, path: &Path) -> Result<Vec<f32>> {
    if rgb.channels != 1 && rgb.channels != 3 {
        return Err(input_error(
            path,
            &format!(
                "cannot save a {}-channel image (1 or 3 expected)",
                rgb.channels
            ),
        ));
    }
    if rgb.width == 0 || rgb.height == 0 {
        return Err(input_error(path, "cannot save an empty image"));
    }
    let Some(alpha) = alpha else {
        return Ok(rgb.data.clone());
    };
    if alpha.channels != 1 || alpha.width != rgb.width || alpha.height != rgb.height {
        return Err(input_error(
            path,
            &format!(
                "alpha plane is {}x{}x{}, image is {}x{}",
                alpha.width, alpha.height, alpha.channels, rgb.width, rgb.height
            ),
        ));
    }
    let mut out = Vec::with_capacity(rgb.data.len() + alpha.data.len());
    for (px, a) in rgb.data.chunks_exact(rgb.channels).zip(&alpha.data) {
        out.extend_from_slice(px);
        out.push(*a);
    }
    Ok(out)
}

/// Writes a PNG (8 or 16 bit, RGB/gray with optional alpha) with tEXt chunks (iTXt for text
/// outside Latin-1). Atomic; refuses to replace `path` unless `overwrite`.
pub fn save_png(
    path: impl AsRef<Path>,
    rgb: &ImageF32,
    alpha: Option<&ImageF32>,
    sixteen_bit: bool,
    text_metadata: &[(String, String)],
    overwrite: bool,
) -> Result<()> {
    let path = path.as_ref();
    let bytes = encode_png(path, rgb, alpha, sixteen_bit, text_metadata)?;
    crate::fsutil::write_bytes(
        path,
        &bytes,
        crate::fsutil::WriteMode::from_force(overwrite),
    )
}

/// Encodes a PNG into memory; see [`save_png`].
pub fn encode_png(
    path: &Path,
    rgb: &ImageF32,
    alpha: Option<&ImageF32>,
    sixteen_bit: bool,
    text_metadata: &[(String, String)],
) -> Result<Vec<u8>> {
    let samples = interleave(rgb, alpha, path)?;
    let color = match (rgb.channels, alpha.is_some()) {
        (1, false) => png::ColorType::Grayscale,
        (1, true) => png::ColorType::GrayscaleAlpha,
        (_, false) => png::ColorType::Rgb,
        (_, true) => png::ColorType::Rgba,
    };
    let data: Vec<u8> = if sixteen_bit {
        samples
            .iter()
            .flat_map(|&v| quantize_u16(v).to_be_bytes())
            .collect()
    } else {
        samples.iter().map(|&v| quantize_u8(v)).collect()
    };
    let encode_err = |e: png::EncodingError| input_error(path, &format!("cannot encode PNG ({e})"));
    let mut out = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut out, rgb.width as u32, rgb.height as u32);
        encoder.set_color(color);
        encoder.set_depth(if sixteen_bit {
            png::BitDepth::Sixteen
        } else {
            png::BitDepth::Eight
        });
        for (key, value) in text_metadata {
            let latin1 = key.chars().chain(value.chars()).all(|c| (c as u32) < 256);
            if latin1 {
                encoder.add_text_chunk(key.clone(), value.clone())
            } else {
                encoder.add_itxt_chunk(key.clone(), value.clone())
            }
            .map_err(encode_err)?;
        }
        let mut writer = encoder.write_header().map_err(encode_err)?;
        writer.write_image_data(&data).map_err(encode_err)?;
        writer.finish().map_err(encode_err)?;
    }
    Ok(out)
}

/// Default JPEG quality of saved outputs (`restore --quality`).
pub const JPEG_QUALITY: u8 = 95;

/// The file formats outputs are written in, chosen by the output's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputFormat {
    Png,
    Jpeg,
    /// Lossless WebP (the image crate encodes no lossy WebP).
    Webp,
    Bmp,
    Tiff,
}

/// Where an output's settings (seed, steps, prompts, identity) went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MetadataStorage {
    /// PNG text chunks.
    PngText,
    /// A JPEG comment (COM) segment, one `key: value` line each.
    JpegComment,
    /// The format (or its encoder here) carries no text: nothing stored.
    NotStored,
}

impl OutputFormat {
    /// The format of a file extension (case-insensitive), if outputs can be written in it.
    pub fn from_extension(ext: &str) -> Option<Self> {
        Some(match ext.to_ascii_lowercase().as_str() {
            "png" => OutputFormat::Png,
            "jpg" | "jpeg" => OutputFormat::Jpeg,
            "webp" => OutputFormat::Webp,
            "bmp" => OutputFormat::Bmp,
            "tif" | "tiff" => OutputFormat::Tiff,
            _ => return None,
        })
    }

    /// The format of `path`'s extension.
    pub fn from_path(path: &Path) -> Option<Self> {
        Self::from_extension(path.extension()?.to_str()?)
    }

    /// Whether 16-bit samples survive (PNG and TIFF); the others are written in 8 bit.
    pub fn keeps_16_bit(self) -> bool {
        matches!(self, OutputFormat::Png | OutputFormat::Tiff)
    }

    /// Where text metadata goes in this format.
    pub fn metadata_storage(self) -> MetadataStorage {
        match self {
            OutputFormat::Png => MetadataStorage::PngText,
            OutputFormat::Jpeg => MetadataStorage::JpegComment,
            _ => MetadataStorage::NotStored,
        }
    }

    /// Whether an alpha plane survives (JPEG drops it).
    pub fn keeps_alpha(self) -> bool {
        self != OutputFormat::Jpeg
    }
}

/// What [`save_output`] writes: colour (1 or 3 channels), optional alpha, and how.
pub struct OutputImage<'a> {
    pub rgb: &'a ImageF32,
    pub alpha: Option<&'a ImageF32>,
    /// Keep 16-bit samples where the format allows (a 16-bit input).
    pub sixteen_bit: bool,
    pub text: &'a [(String, String)],
    /// JPEG quality, 1..=100.
    pub quality: u8,
}

/// Encodes `image` in `format` into memory; see [`save_output`].
pub fn encode_output(path: &Path, format: OutputFormat, image: &OutputImage) -> Result<Vec<u8>> {
    let OutputImage {
        rgb,
        alpha,
        sixteen_bit,
        text,
        quality,
    } = *image;
    let alpha = alpha.filter(|_| format.keeps_alpha());
    let sixteen_bit = sixteen_bit && format.keeps_16_bit();
    Ok(match format {
        OutputFormat::Png => encode_png(path, rgb, alpha, sixteen_bit, text)?,
        OutputFormat::Jpeg => {
            let bytes = encode_with(path, rgb, None, |buf, data, w, h, color| {
                image::codecs::jpeg::JpegEncoder::new_with_quality(buf, quality.clamp(1, 100))
                    .encode(data, w, h, color)
            })?;
            insert_jpeg_comment(bytes, text)
        }
        OutputFormat::Webp => encode_with(path, rgb, alpha, |buf, data, w, h, color| {
            image::codecs::webp::WebPEncoder::new_lossless(buf).encode(data, w, h, color)
        })?,
        OutputFormat::Bmp => encode_with(path, rgb, alpha, |buf, data, w, h, color| {
            image::codecs::bmp::BmpEncoder::new(buf).encode(data, w, h, color)
        })?,
        OutputFormat::Tiff if sixteen_bit => encode_tiff16(path, rgb, alpha)?,
        OutputFormat::Tiff => encode_with(path, rgb, alpha, |buf, data, w, h, color| {
            use image::ImageEncoder;
            image::codecs::tiff::TiffEncoder::new(buf).write_image(data, w, h, color)
        })?,
    })
}

/// Writes `image` to `path` in `format`. Atomic; refuses to replace `path` unless `overwrite`.
/// Returns where the text metadata went.
pub fn save_output(
    path: &Path,
    format: OutputFormat,
    image: &OutputImage,
    overwrite: bool,
) -> Result<MetadataStorage> {
    let bytes = encode_output(path, format, image)?;
    crate::fsutil::write_bytes(
        path,
        &bytes,
        crate::fsutil::WriteMode::from_force(overwrite),
    )?;
    Ok(if image.text.is_empty() {
        MetadataStorage::NotStored
    } else {
        format.metadata_storage()
    })
}

/// Saves by extension (see [`OutputFormat`]), 8 bit, no metadata. Atomic; refuses to replace
/// `path` unless `overwrite`.
pub fn save_image(
    path: impl AsRef<Path>,
    rgb: &ImageF32,
    alpha: Option<&ImageF32>,
    overwrite: bool,
) -> Result<()> {
    let path = path.as_ref();
    let format = OutputFormat::from_path(path).ok_or_else(|| {
        input_error(
            path,
            "unknown output format (use .png, .jpg, .webp, .bmp or .tif)",
        )
    })?;
    let image = OutputImage {
        rgb,
        alpha,
        sixteen_bit: false,
        text: &[],
        quality: JPEG_QUALITY,
    };
    save_output(path, format, &image, overwrite).map(drop)
}

/// Largest payload of one JPEG segment (its 16-bit length counts its own two bytes).
const MAX_JPEG_SEGMENT: usize = 65533;

/// Puts `text` into a COM segment after the JFIF header (or after SOI when there is none), one
/// `key: value` line each, cut at the segment limit.
fn insert_jpeg_comment(mut bytes: Vec<u8>, text: &[(String, String)]) -> Vec<u8> {
    if text.is_empty() || bytes.len() < 4 || bytes[..2] != [0xFF, 0xD8] {
        return bytes;
    }
    let mut comment: Vec<u8> = text
        .iter()
        .map(|(k, v)| format!("{k}: {}\n", v.replace('\n', " ")))
        .collect::<String>()
        .into_bytes();
    comment.truncate(MAX_JPEG_SEGMENT);
    let mut at = 2;
    if bytes.len() >= 6 && bytes[2..4] == [0xFF, 0xE0] {
        at = 4 + u16::from_be_bytes([bytes[4], bytes[5]]) as usize;
    }
    let mut segment = vec![0xFF, 0xFE];
    segment.extend_from_slice(&((comment.len() + 2) as u16).to_be_bytes());
    segment.extend_from_slice(&comment);
    bytes.splice(at..at, segment);
    bytes
}

/// The text of a JPEG's COM segments (for tests and `pfstorer` readers).
pub fn jpeg_comments(bytes: &[u8]) -> Vec<String> {
    let mut out = Vec::new();
    let mut pos = 2;
    while pos + 4 <= bytes.len() && bytes[pos] == 0xFF {
        let marker = bytes[pos + 1];
        let len = u16::from_be_bytes([bytes[pos + 2], bytes[pos + 3]]) as usize;
        if marker == 0xDA || len < 2 || pos + 2 + len > bytes.len() {
            break;
        }
        if marker == 0xFE {
            out.push(String::from_utf8_lossy(&bytes[pos + 4..pos + 2 + len]).into_owned());
        }
        pos += 2 + len;
    }
    out
}

/// A 16-bit TIFF (RGB or gray, with optional alpha).
fn encode_tiff16(path: &Path, rgb: &ImageF32, alpha: Option<&ImageF32>) -> Result<Vec<u8>> {
    use image::ImageEncoder;
    let samples = interleave(rgb, alpha, path)?;
    let data: Vec<u8> = samples
        .iter()
        .flat_map(|&v| quantize_u16(v).to_ne_bytes())
        .collect();
    let color = match (rgb.channels, alpha.is_some()) {
        (1, false) => image::ExtendedColorType::L16,
        (1, true) => image::ExtendedColorType::La16,
        (_, false) => image::ExtendedColorType::Rgb16,
        (_, true) => image::ExtendedColorType::Rgba16,
    };
    let mut buf = Cursor::new(Vec::new());
    image::codecs::tiff::TiffEncoder::new(&mut buf)
        .write_image(&data, rgb.width as u32, rgb.height as u32, color)
        .map_err(|e| input_error(path, &format!("cannot encode TIFF ({e})")))?;
    Ok(buf.into_inner())
}

fn encode_with(
    path: &Path,
    rgb: &ImageF32,
    alpha: Option<&ImageF32>,
    encode: impl FnOnce(
        &mut Cursor<Vec<u8>>,
        &[u8],
        u32,
        u32,
        image::ExtendedColorType,
    ) -> image::ImageResult<()>,
) -> Result<Vec<u8>> {
    let samples = interleave(rgb, alpha, path)?;
    let data: Vec<u8> = samples.iter().map(|&v| quantize_u8(v)).collect();
    let color = match (rgb.channels, alpha.is_some()) {
        (1, false) => image::ExtendedColorType::L8,
        (1, true) => image::ExtendedColorType::La8,
        (_, false) => image::ExtendedColorType::Rgb8,
        (_, true) => image::ExtendedColorType::Rgba8,
    };
    let mut buf = Cursor::new(Vec::new());
    encode(&mut buf, &data, rgb.width as u32, rgb.height as u32, color)
        .map_err(|e| input_error(path, &format!("cannot encode ({e})")))?;
    Ok(buf.into_inner())
}
