//! `pfstorer restore <inputs...>`: restore photos with the base model or an identity (`--id`).
//!
//! The flow reads top to bottom: [`plan`] decides everything that needs no model (flags,
//! inputs, outputs), [`run`] loads the networks once and hands each planned item to
//! [`image`], which restores and writes it.

mod faces;
mod image;
mod plan;

pub(crate) use image::human_duration;
pub use image::MIN_INPUT_SIDE;

use super::batch::{self, Outcome};
use super::model_args::ModelArgs;
use super::report::ReportWriter;
use crate::imaging::colorfix::ColorFix;
use crate::model::base::Residency;
use crate::personalize::identity::Identity;
use crate::restore::Conditioning;
use crate::restore::{
    Personalization, ResidencyPolicy, Restorer, StagedNetworks, WeightSource, BASE_SUBJECT,
    DEFAULT_NEGATIVE_PROMPT, DEFAULT_PROMPT,
};
use crate::weights::base_fingerprint_cached;
use anyhow::Context;
use candle_core::DType;
use clap::Args;
use faces::{Background, FaceJob, FacesMode};
use image::{file_name, restore_one, step_bar, IdentityChoice, ImageJob};
use indicatif::MultiProgress;
use plan::RestoreJob;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Debug, Args)]
pub struct RestoreArgs {
    /// Image files, directories (their images, not recursive) or glob patterns.
    #[arg(required_unless_present = "input_flag")]
    pub inputs: Vec<PathBuf>,
    /// More inputs, as GFPGAN/CodeFormer spell them (`-i photos/`); same as positional ones.
    #[arg(short = 'i', long = "input", value_name = "PATH")]
    pub input_flag: Vec<PathBuf>,
    /// Output file (one input; its extension picks the format) or directory (default: next to
    /// each input).
    #[arg(short, long)]
    pub output: Option<PathBuf>,
    /// Output format of files named by pfstorer: png (the default), jpg, webp (lossless), bmp,
    /// tif, or auto (the input's own format where it can be written, else png).
    #[arg(long, value_name = "EXT")]
    pub ext: Option<String>,
    /// JPEG quality (1-100) of .jpg outputs.
    #[arg(long, default_value_t = crate::imaging::io::JPEG_QUALITY, value_name = "Q")]
    pub quality: u8,
    /// Upscaling factor (fractional allowed).
    #[arg(short, long, default_value_t = 4.0, conflicts_with_all = ["size", "long_side"])]
    pub scale: f64,
    /// Exact output size, WIDTHxHEIGHT.
    #[arg(long, value_name = "WxH")]
    pub size: Option<String>,
    /// Output long side in pixels (aspect kept).
    #[arg(long, value_name = "N")]
    pub long_side: Option<usize>,
    /// DDPM steps (the 1000-step schedule respaced).
    #[arg(long, default_value_t = 200)]
    pub steps: usize,
    /// Classifier-free guidance scale (paper Eq. 9); 1 turns the negative prompt off.
    #[arg(long, default_value_t = 4.0)]
    pub cfg: f64,
    /// Random seed; the same seed gives the same output.
    #[arg(long, default_value_t = 42)]
    pub seed: u64,
    /// Positive prompt; `*` is the identity's token (or "person" without --id).
    #[arg(long, default_value = DEFAULT_PROMPT)]
    pub prompt: String,
    /// Negative prompt (the unconditional branch of CFG).
    #[arg(long, default_value = DEFAULT_NEGATIVE_PROMPT)]
    pub negative_prompt: String,
    /// Overlap of the latent tiles, in latents; default: 32 (StableSR's tile script, 64-latent
    /// tiles), half the tile for a smaller --input-size.
    #[arg(long, value_name = "LATENTS")]
    pub tile_overlap: Option<usize>,
    /// The model's native size in pixels (StableSR's `--input_size`): short sides below it are
    /// processed at it, latent tiles are this size / 8 (the VAE's downsampling factor). Default: the config's image_size (512).
    #[arg(long, value_name = "PIXELS")]
    pub input_size: Option<usize>,
    /// Images whose padded side exceeds this many pixels are processed in overlapping square
    /// patches of this size (StableSR's `--vqgantile_size`), bounding memory.
    #[arg(long, default_value_t = 1280, value_name = "PIXELS")]
    pub patch_size: usize,
    /// Stride between those patches (StableSR's `--vqgantile_stride`).
    #[arg(long, default_value_t = 1000, value_name = "PIXELS")]
    pub patch_stride: usize,
    /// CFW fusion weight of the decoder (0 = pure diffusion output, 1 = most LQ detail kept).
    #[arg(long, default_value_t = 0.5)]
    pub dec_w: f64,
    /// Colour correction after decoding.
    #[arg(long, value_enum, default_value_t = ColorFix::Adain)]
    pub color_fix: ColorFix,
    /// Output name suffix before `.png` (a file-name fragment: no `/`).
    #[arg(long, default_value = "_restored")]
    pub suffix: String,
    /// Largest image processed at once, in megapixels after upscaling and padding; larger
    /// requests are refused per file before any compute (image buffers take about 96 bytes a
    /// pixel). Also the largest input decoded.
    #[arg(long, default_value_t = 64.0, value_name = "MP")]
    pub max_megapixels: f64,
    /// Latent tiles, or face crops of one identity, per UNet call (twice the rows with CFG);
    /// default: 1 on the CPU, on a GPU as many as half its free memory holds (at most 8).
    /// Memory grows with it, the result does not change.
    #[arg(long, value_name = "N")]
    pub tile_batch: Option<usize>,
    /// Whether the networks stay loaded for the whole batch. staged: each image loads the VAE
    /// encoder, then the UNet, then the CFW decoder, freeing each before the next (a 512x512
    /// f32 restore then peaks near the UNet's own 3.9 GB; reloading takes seconds per image);
    /// resident: all loaded once (about 2 GB more, no reloads); auto: staged on the CPU,
    /// resident on a GPU. The result does not change.
    #[arg(long, value_enum, default_value_t = ResidencyPolicy::Auto)]
    pub residency: ResidencyPolicy,
    /// Replace existing outputs.
    #[arg(long)]
    pub force: bool,
    /// Skip inputs whose output exists (resume a batch).
    #[arg(long)]
    pub skip_existing: bool,
    /// No progress bars and no per-file lines (errors and the summary still print).
    #[arg(short, long)]
    pub quiet: bool,
    /// Also print the sampling details (patches, latent tiles, UNet calls) of each image.
    #[arg(short, long)]
    pub verbose: bool,
    /// How faces are handled: auto (the photo whole when it is a face crop, else each face),
    /// each (detect, restore every face on an aligned crop, paste back), whole (the whole photo
    /// is one face; GFPGAN's --aligned).
    #[arg(long, value_enum, default_value_t = FacesMode::Auto)]
    pub faces: FacesMode,
    /// Same as --faces whole (GFPGAN/CodeFormer's spelling).
    #[arg(long, conflicts_with = "faces")]
    pub aligned: bool,
    /// Under the pasted faces: lanczos (the photo upscaled, seconds) or model (the whole photo
    /// through the diffusion first; hours on a CPU for a large photo).
    #[arg(long, alias = "bg-upsampler", value_enum, default_value_t = Background::Lanczos)]
    pub background: Background,
    /// Restore only these faces, by the numbers `pfstorer faces` prints (e.g. --face 1,3).
    #[arg(long, value_delimiter = ',', value_name = "N,...")]
    pub face: Vec<usize>,
    /// Restore only the face nearest the photo's centre.
    #[arg(long)]
    pub only_center_face: bool,
    /// Restore faces that would be enlarged when pasted (larger in the output than the
    /// model's crop) on an N-pixel crop with the tiled path instead.
    #[arg(long, value_name = "N")]
    pub face_size: Option<usize>,
    /// Write each face's aligned input crop and its restoration into DIR/cropped_faces and
    /// DIR/restored_faces.
    #[arg(long, value_name = "DIR")]
    pub save_faces: Option<PathBuf>,
    /// Write the photo with the restored faces' numbered boxes to FILE (a folder for several
    /// inputs).
    #[arg(long, value_name = "FILE")]
    pub show_faces: Option<PathBuf>,
    #[command(flatten)]
    pub detection: crate::cli::face_args::DetectionArgs,
    /// Identity (name or file) from `pfstorer personalize`; repeat for several people
    /// (`--id anna --id ben`): each face goes to the identity its dlib-ID descriptor matches
    /// (one-to-one, under the acceptance distance), the others to the base model.
    #[arg(long = "id", value_name = "NAME|PATH")]
    pub ids: Vec<String>,
    /// Give face N an identity by hand, overriding the matching (`--id-face 2=anna`; `base`
    /// for the base model). Repeatable.
    #[arg(long, value_name = "N=NAME")]
    pub id_face: Vec<String>,
    /// Weight of the identity's image cross-attention (the paper's lambda_att); 0 keeps only the learned token.
    #[arg(long, default_value_t = 1.0)]
    pub id_strength: f64,
    /// Which of the identity's reference photos conditions the restoration (0-based, in the
    /// order `pfstorer ids show` lists them).
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub id_ref: usize,
    #[command(flatten)]
    pub shard: super::shard::ShardFlag,
    #[command(flatten)]
    pub report: super::report::ReportFlag,
    #[command(flatten)]
    pub model: ModelArgs,
}

pub fn run(args: RestoreArgs) -> anyhow::Result<()> {
    let RestoreJob {
        target,
        settings,
        base_config,
        policy,
        shard,
        items,
        mut summary,
    } = {
        // Every flag is checked before any file is touched; then the identity, so a wrong
        // name fails before any model is read.
        let job = RestoreJob::plan(&args)?;
        if !args.quiet {
            if let Some(note) = job.metadata_note() {
                eprintln!("{note}");
            }
        }
        job
    };
    let identities = args
        .ids
        .iter()
        .map(|id| Identity::load(id))
        .collect::<crate::Result<Vec<_>>>()?;
    let identity = identities.first().cloned();
    let mut report = ReportWriter::open(&args.report, shard, args.steps, args.seed)?;
    report.refused(&summary)?;
    if items.is_empty() {
        return summary.finish();
    }

    let faces_mode = if args.aligned {
        FacesMode::Whole
    } else {
        args.faces
    };
    if identities.len() > 1 && faces_mode == FacesMode::Whole {
        return Err(super::usage(anyhow::anyhow!(
            "{} identities with --faces whole: several --id match faces, so they need face detection (--faces auto or each)",
            identities.len()
        )));
    }
    if identities.len() > crate::faces::matching::MAX_IDENTITIES {
        return Err(super::usage(anyhow::anyhow!(
            "{} identities: at most {} per restore",
            identities.len(),
            crate::faces::matching::MAX_IDENTITIES
        )));
    }
    let id_faces = parse_id_faces(&args.id_face, &identities).map_err(super::usage)?;
    let native_size = base_config.diffusion.image_size;
    let base_path = args.model.base_path(!args.quiet)?;
    let fingerprint = if identities.is_empty() {
        None
    } else {
        let fingerprint = base_fingerprint_cached(&base_path)?;
        for identity in &identities {
            identity.check_base(&fingerprint)?;
        }
        Some(fingerprint)
    };
    let cfw_path = args.model.cfw_path(!args.quiet)?;
    // After the files are found: a missing checkpoint stays a one-line error.
    let (device, dtype) = args.model.device_dtype()?;
    report.set_device(&device, dtype);
    let run_label = format!(
        "{}, {}",
        crate::device::device_label(&device),
        crate::device::dtype_name(dtype)
    );
    // First the text encoder alone: every prompt context (and the identity's) is computed
    // before the sampling networks are read, so its ~1.4 GB of weights and the UNet's ~3.7 GB
    // are never in memory together (the freed memory then holds the UNet).
    let base_source = WeightSource::open(&base_path)?;
    let (text_model, base_unused) =
        base_source.load_base(base_config.clone(), dtype, &device, Residency::TextOnly)?;
    // With an identity `*` is its learned token; without one it becomes "person".
    let prompt = match identity {
        Some(_) => args.prompt.clone(),
        None => args.prompt.replace('*', BASE_SUBJECT),
    };
    // The base contexts serve every face restored without an identity.
    let cond = Restorer::text_context(&text_model, &args.prompt.replace('*', BASE_SUBJECT))?;
    let uncond = Restorer::text_context(&text_model, &args.negative_prompt)?;
    let max_input_pixels = settings.max_pixels;
    let mut identity_line = "none (base model)".to_string();
    let mut prepared_ids = Vec::with_capacity(identities.len());
    if let Some(fingerprint) = &fingerprint {
        for (identity, given) in identities.iter().zip(&args.ids) {
            let mut prepared = Personalization::new(
                identity,
                &text_model,
                fingerprint,
                &prompt,
                &args.negative_prompt,
                args.id_strength,
            )?;
            if args.id_ref != 0 {
                prepared
                    .use_reference(identity, &text_model, args.id_ref)
                    .with_context(|| format!("--id-ref {}", args.id_ref))?;
            }
            if !args.quiet {
                let path = crate::personalize::identity::resolve(given)
                    .map(|p| crate::fsutil::printable_path(&p))
                    .unwrap_or_default();
                let embeddings = match identity.reference_embeddings()? {
                    Some(e) => format!("{} reference descriptors", e.len()),
                    None => "no face descriptors: matched to faces only by --id-face or as the only face".into(),
                };
                eprintln!(
                    "identity: {} from {path} (made for these base weights: fingerprint {}… matches; {embeddings})",
                    crate::fsutil::printable(&prepared.name),
                    fingerprint.get(..12).unwrap_or(fingerprint)
                );
            }
            prepared_ids.push(prepared);
        }
        let names: Vec<&str> = prepared_ids.iter().map(|p| p.name.as_str()).collect();
        identity_line = format!("{} (base {fingerprint})", names.join(", "));
    }
    drop(text_model);
    let cfw_config = args.model.cfw_config()?;
    // Both owners live to the end of the batch; only one is filled.
    let (base, cfw);
    let mut restorer = if args.residency.is_staged(&device) {
        // The text-only load above checked every key of the diffusion checkpoint; the CFW file
        // is checked here, before any image is read, without reading its weights.
        let cfw_source = WeightSource::open(&cfw_path)?;
        for (path, unused) in [
            (&base_path, base_unused),
            (&cfw_path, cfw_source.check_cfw(cfw_config.clone())?),
        ] {
            if let Some(line) = unused {
                eprintln!("note: {}: {line}", path.display());
            }
        }
        let staged = StagedNetworks {
            base: base_source,
            base_config,
            cfw: cfw_source,
            cfw_config,
            dtype,
            // As resident below: the CFW decoder in f32.
            cfw_dtype: DType::F32,
            device: device.clone(),
        };
        Restorer::staged(staged, settings, cond, uncond)?
    } else {
        let (loaded, unused) =
            base_source.load_base(base_config, dtype, &device, Residency::WithoutText)?;
        if let Some(line) = unused {
            eprintln!("note: {}: {line}", base_path.display());
        }
        base = loaded;
        // The CFW decoder writes the final pixels: it stays in f32 when the UNet runs in half
        // precision (a few percent of the run time; avoids f16 overflow in its up-sampling
        // stack).
        let (loaded, unused) =
            WeightSource::open(&cfw_path)?.load_cfw(cfw_config, DType::F32, &device)?;
        if let Some(line) = unused {
            eprintln!("note: {}: {line}", cfw_path.display());
        }
        cfw = loaded;
        Restorer::new(&base, &cfw, settings, cond, uncond)?
    };
    // One identity is the restorer's own (whole photos and single faces use it); with several,
    // each face picks its own from `prepared_ids`.
    let single = if prepared_ids.len() == 1 {
        restorer = restorer.with_personalization(prepared_ids.remove(0))?;
        true
    } else {
        false
    };
    let choices: Vec<IdentityChoice> = if single {
        vec![IdentityChoice {
            name: identities[0].name().to_string(),
            mean: identities[0].embedding_mean()?,
            who: Conditioning::Configured,
        }]
    } else {
        identities
            .iter()
            .zip(&prepared_ids)
            .map(|(identity, p)| {
                Ok(IdentityChoice {
                    name: identity.name().to_string(),
                    mean: identity.embedding_mean()?,
                    who: Conditioning::Identity(p),
                })
            })
            .collect::<crate::Result<Vec<_>>>()?
    };
    let embedder = if !choices.is_empty() && faces_mode != FacesMode::Whole {
        Some(crate::faces::embed::Embedder::load_embedded(&device)?)
    } else {
        None
    };
    let mut metadata_common = vec![
        (
            "Software".to_string(),
            format!("pfstorer {}", env!("CARGO_PKG_VERSION")),
        ),
        ("pfstorer:base".to_string(), file_name(&base_path)),
        ("pfstorer:cfw".to_string(), file_name(&cfw_path)),
        ("pfstorer:seed".to_string(), args.seed.to_string()),
        ("pfstorer:steps".to_string(), args.steps.to_string()),
        ("pfstorer:cfg".to_string(), args.cfg.to_string()),
        ("pfstorer:dec_w".to_string(), args.dec_w.to_string()),
        ("pfstorer:color_fix".to_string(), args.color_fix.to_string()),
        ("pfstorer:prompt".to_string(), prompt.clone()),
        (
            "pfstorer:negative_prompt".to_string(),
            args.negative_prompt.clone(),
        ),
        ("pfstorer:identity".to_string(), identity_line),
    ];
    if identity.is_some() {
        metadata_common.push((
            "pfstorer:id_strength".to_string(),
            args.id_strength.to_string(),
        ));
        metadata_common.push(("pfstorer:id_ref".to_string(), args.id_ref.to_string()));
    }

    let detector = match faces_mode {
        FacesMode::Whole => None,
        _ => Some(crate::faces::retinaface::RetinaFace::load_embedded(
            &device,
        )?),
    };
    let face_job = detector.as_ref().map(|detector| FaceJob {
        detector,
        detect: args.detection.detect_options(),
        selection: args.detection.selection(&args.face, args.only_center_face),
        mode: faces_mode,
        background: args.background,
        face_size: args.face_size,
        native: args.input_size.unwrap_or(native_size),
        save_faces: args.save_faces.clone(),
        show_faces: args.show_faces.clone(),
        many_inputs: items.len() > 1,
        overwrite: policy.overwrite(),
    });
    let job = ImageJob {
        faces: face_job.as_ref(),
        identities: &choices,
        id_faces: &id_faces,
        embedder: embedder.as_ref(),
        target,
        metadata: &metadata_common,
        overwrite: policy.overwrite(),
        max_input_pixels,
        run_label: &run_label,
        quality: args.quality,
        verbose: args.verbose,
    };
    let bars = MultiProgress::new();
    let images = bars.add(batch::progress_bar(items.len(), args.quiet));
    images.set_message("images");
    for item in &items {
        let (input, output) = (&item.input, &item.output);
        let steps = bars.add(step_bar(args.quiet));
        steps.set_message(crate::fsutil::printable(&file_name(input)));
        let started = Instant::now();
        let mut face_records = None;
        let outcome =
            match restore_one(&restorer, input, (output, item.format), &job, &steps, &bars) {
                Ok(faces) => {
                    let restored_faces = faces
                        .as_ref()
                        .map(|f| f.iter().filter(|f| f.restored).count());
                    summary.faces += restored_faces.unwrap_or(0);
                    face_records = faces;
                    let faces = match restored_faces {
                        Some(n) => format!(", {n} face{}", if n == 1 { "" } else { "s" }),
                        None => String::new(),
                    };
                    // Scripts read this line: printed whether or not stderr is a terminal.
                    if !args.quiet {
                        bars.suspend(|| {
                            eprintln!(
                                "{} -> {} ({:.1} s{faces})",
                                crate::fsutil::printable_path(input),
                                crate::fsutil::printable_path(output),
                                started.elapsed().as_secs_f64()
                            )
                        });
                    }
                    Outcome::Done
                }
                Err(e) => Outcome::Failed(batch::reason(&e, input)),
            };
        steps.finish_and_clear();
        let seconds = started.elapsed().as_secs_f64();
        report.finished(input, Some(output), &outcome, seconds, face_records)?;
        summary.record(input, outcome);
        images.inc(1);
    }
    images.finish_and_clear();
    summary.finish()
}

/// `--id-face N=NAME` overrides: face number to an identity's position in `--id` order, or
/// `None` for `base`.
fn parse_id_faces(
    given: &[String],
    identities: &[Identity],
) -> anyhow::Result<Vec<(usize, Option<usize>)>> {
    given
        .iter()
        .map(|spec| {
            let (n, name) = spec
                .split_once('=')
                .with_context(|| format!("--id-face {spec}: expected FACE=NAME, e.g. 2=anna"))?;
            let face: usize = n
                .trim()
                .parse()
                .ok()
                .filter(|&f| f > 0)
                .with_context(|| format!("--id-face {spec}: the face is a number from 1"))?;
            let name = name.trim();
            if name == "base" {
                return Ok((face, None));
            }
            let pos = identities
                .iter()
                .position(|i| i.name() == name)
                .with_context(|| {
                    format!(
                        "--id-face {spec}: {name:?} is not one of the --id identities (or base)"
                    )
                })?;
            Ok((face, Some(pos)))
        })
        .collect()
}
