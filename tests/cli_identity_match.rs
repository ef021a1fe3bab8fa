//! Who is who, through the binary on the tiny model: two identities made from two people's
//! photos (identity/ fixture chips of two different persons, placed on canvases), a photo with
//! both faces, and `restore --id A --id B` giving each face its person; with only A, B's face
//! gets the base model; `--id-face` overrides; a reference of another person is refused without
//! --force; an identity without descriptors (the older format) still restores.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn pfstorer(args: &[String]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pfstorer"))
        .args(args)
        .output()
        .expect("run pfstorer")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// One chip file of each of two different persons, from identity.json.
fn two_people() -> [(String, PathBuf); 2] {
    let json: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(common::fixture("faces/identity/identity.json")).unwrap(),
    )
    .unwrap();
    let chips = json["chips"].as_array().unwrap();
    let first = &chips[0];
    let person = |c: &serde_json::Value| c["person"].as_str().unwrap().to_string();
    let other = chips
        .iter()
        .find(|c| person(c) != person(first))
        .expect("the fixture has two persons");
    [first, other].map(|c| {
        (
            person(c),
            common::fixture(&format!("faces/identity/{}", c["file"].as_str().unwrap())),
        )
    })
}

/// `chip` scaled to `side` and placed at `(x, y)` on a plain canvas.
fn place(canvas: &mut image::RgbImage, chip: &Path, side: u32, x: u32, y: u32) {
    let img = image::open(chip).unwrap().to_rgb8();
    let img = image::imageops::resize(&img, side, side, image::imageops::FilterType::CatmullRom);
    image::imageops::overlay(canvas, &img, x as i64, y as i64);
}

fn canvas(w: u32, h: u32) -> image::RgbImage {
    image::RgbImage::from_pixel(w, h, image::Rgb([128, 124, 120]))
}

/// Three reference photos of `chip`'s person: the chip at three sizes and places.
fn references(dir: &Path, tag: &str, chip: &Path) -> Vec<PathBuf> {
    (0..3u32)
        .map(|k| {
            let mut c = canvas(260, 240);
            place(&mut c, chip, 170 + 20 * k, 10 + 20 * k, 15 + 10 * k);
            let path = dir.join(format!("{tag}_ref{k}.png"));
            c.save(&path).unwrap();
            path
        })
        .collect()
}

fn personalize(dir: &Path, name: &str, refs: &[PathBuf], extra: &[&str]) -> (Output, PathBuf) {
    let out = dir.join(format!("{name}.identity.safetensors"));
    let mut args = vec!["personalize".to_string(), "--refs".into()];
    args.extend(refs.iter().map(|p| p.display().to_string()));
    args.extend(
        [
            "--id",
            name,
            "--steps",
            "1",
            "--size",
            "64",
            "--face-threshold",
            "0.5",
            "-o",
        ]
        .iter()
        .map(|s| s.to_string()),
    );
    args.push(out.display().to_string());
    args.extend(extra.iter().map(|s| s.to_string()));
    args.extend(common::model_flags());
    (pfstorer(&args), out)
}

fn restore(photo: &Path, out: &Path, extra: &[String]) -> Output {
    let mut args = vec![
        "restore".to_string(),
        photo.display().to_string(),
        "-o".into(),
        out.display().to_string(),
        "-s".into(),
        "1".into(),
        "--faces".into(),
        "each".into(),
        "--face-threshold".into(),
        "0.5".into(),
    ];
    args.extend(extra.iter().cloned());
    args.extend(common::fast_sampling_flags());
    args.extend(common::model_flags());
    pfstorer(&args)
}

#[test]
fn faces_are_matched_to_their_identities() {
    let dir = common::scratch("id-match");
    let [(_, chip_a), (_, chip_b)] = two_people();
    let (o, id_a) = personalize(&dir, "anna", &references(&dir, "a", &chip_a), &[]);
    assert!(o.status.success(), "{}", stderr(&o));
    let (o, id_b) = personalize(&dir, "ben", &references(&dir, "b", &chip_b), &[]);
    assert!(o.status.success(), "{}", stderr(&o));

    // A photo with A on the left (face 1) and B on the right (face 2).
    let mut group = canvas(460, 240);
    place(&mut group, &chip_a, 180, 20, 30);
    place(&mut group, &chip_b, 180, 260, 30);
    let photo = dir.join("both.png");
    group.save(&photo).unwrap();
    let ids = |list: &[&Path]| -> Vec<String> {
        list.iter()
            .flat_map(|p| ["--id".to_string(), p.display().to_string()])
            .collect()
    };

    let report = dir.join("r1.jsonl");
    let mut args = ids(&[&id_a, &id_b]);
    args.extend(["--report".to_string(), report.display().to_string()]);
    let o = restore(&photo, &dir.join("r1.png"), &args);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("face 1 -> anna ("), "{err}");
    assert!(err.contains("face 2 -> ben ("), "{err}");
    // The report carries each restored face's identity and its dlib-ID distance, the number
    // the summary line prints.
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&report).unwrap().trim()).unwrap();
    for (k, name) in ["anna", "ben"].iter().enumerate() {
        let face = &line["faces"][k];
        assert_eq!(face["identity"], *name, "{line}");
        let d = face["dlib_id_distance"]
            .as_f64()
            .unwrap_or_else(|| panic!("{line}"));
        let printed = format!("face {} restored: dlib-ID distance {d:.2} to {name}", k + 1);
        assert!(err.contains(&printed), "{printed} not in {err}");
    }

    // A face crop restored whole (auto): its face is matched, and its distance reported too.
    let crop_report = dir.join("crop.jsonl");
    let mut args = vec![
        "restore".to_string(),
        chip_a.display().to_string(),
        "-o".into(),
        dir.join("crop.png").display().to_string(),
        "-s".into(),
        "1".into(),
        "--face-threshold".into(),
        "0.5".into(),
        "--report".into(),
        crop_report.display().to_string(),
    ];
    args.extend(ids(&[&id_a]));
    args.extend(common::fast_sampling_flags());
    args.extend(common::model_flags());
    let o = pfstorer(&args);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(
        !err.contains(" face x "),
        "restored face by face, not whole: {err}"
    );
    let line: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&crop_report).unwrap().trim()).unwrap();
    let face = &line["faces"][0];
    assert_eq!(face["identity"], "anna", "{line}");
    let d = face["dlib_id_distance"]
        .as_f64()
        .unwrap_or_else(|| panic!("{line}"));
    assert!(
        err.contains(&format!("face 1 restored: dlib-ID distance {d:.2} to anna")),
        "{err}"
    );

    // Only A given: B's face gets the base model, with its distance to A.
    let o = restore(&photo, &dir.join("r2.png"), &ids(&[&id_a]));
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("face 1 -> anna ("), "{err}");
    assert!(err.contains("face 2 -> base (nearest anna"), "{err}");

    // --id-face overrides the matching.
    let mut args = ids(&[&id_a, &id_b]);
    args.extend([
        "--id-face".to_string(),
        "2=anna".into(),
        "--id-face".into(),
        "1=base".into(),
    ]);
    let o = restore(&photo, &dir.join("r3.png"), &args);
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("face 2 -> anna (--id-face"), "{err}");
    assert!(err.contains("face 1 -> base (--id-face)"), "{err}");
    let mut args = ids(&[&id_a]);
    args.extend(["--id-face".to_string(), "1=nobody".into()]);
    let o = restore(&photo, &dir.join("r4.png"), &args);
    assert_eq!(o.status.code(), Some(2), "{}", stderr(&o));

    // An identity without descriptors (the format before them) still restores its only face.
    let mut tensors = candle_core::safetensors::load(&id_a, &candle_core::Device::Cpu).unwrap();
    tensors.retain(|k, _| !k.starts_with("id."));
    let bytes = std::fs::read(&id_a).unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let metadata = meta.metadata().clone();
    let old = dir.join("old.identity.safetensors");
    let views: Vec<(String, candle_core::Tensor)> = tensors.into_iter().collect();
    safetensors::serialize_to_file(views.iter().map(|(k, v)| (k.as_str(), v)), metadata, &old)
        .unwrap();
    let mut single = canvas(240, 240);
    place(&mut single, &chip_a, 180, 30, 30);
    let one = dir.join("one.png");
    single.save(&one).unwrap();
    let o = restore(&one, &dir.join("r5.png"), &ids(&[&old]));
    let err = stderr(&o);
    assert!(o.status.success(), "{err}");
    assert!(err.contains("no face descriptors"), "{err}");
    assert!(
        err.contains("face 1 -> anna (the only face and identity; distance unknown)"),
        "{err}"
    );
}

#[test]
fn a_reference_of_another_person_is_refused_without_force() {
    let dir = common::scratch("id-odd");
    let [(_, chip_a), (_, chip_b)] = two_people();
    let mut refs = references(&dir, "a", &chip_a);
    refs.truncate(2);
    refs.extend(references(&dir, "b", &chip_b).into_iter().take(1));
    let (o, out) = personalize(&dir, "mixed", &refs, &[]);
    let err = stderr(&o);
    assert_eq!(o.status.code(), Some(1), "{err}");
    assert!(
        err.contains("b_ref0.png looks like another person"),
        "{err}"
    );
    assert!(!out.exists());
    let (o, out) = personalize(&dir, "mixed", &refs, &["--force"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(out.exists());
}
