//! Parity of the OpenCLIP tokenizer and text tower with the reference fixtures
//! (`tokenizer/`, `stablesr/io.safetensors` text.*, `stablesr/grad.safetensors` text.*).

mod common;

use candle_core::{DType, Device, IndexOp, Tensor, Var};
use pfstorer::config::{BaseModelConfig, TextConfig};
use pfstorer::kernels::DifferentiableScope;
use pfstorer::model::text_encoder::{replace_rows, TextEncoder, TEXT_PREFIX};
use pfstorer::model::tokenizer::{
    eot_position, ClipTokenizer, CONTEXT_LENGTH, END_ID, PAD_ID, START_ID,
};
use pfstorer::weights::{CheckedWeights, TensorStore};
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;

/// PFStorer's positive prompt (the placeholder `*` is the learned identity token) and the
/// negative prompt; `io.safetensors` text.* holds [POSITIVE, NEGATIVE, ""].
const POSITIVE: &str =
    "a Photo of *, masterpiece, best quality, realistic, very clear, professional";
const NEGATIVE: &str = "3d, cartoon, anime, sketches, worst quality, low quality";

fn tokenizer() -> ClipTokenizer {
    ClipTokenizer::from_bundled().expect("bundled tokenizer")
}

fn read_json(rel: &str) -> serde_json::Value {
    let path = common::fixture(rel);
    let text = std::fs::read_to_string(&path).expect("readable fixture");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn json_ids(value: &serde_json::Value) -> Vec<u32> {
    value
        .as_array()
        .expect("id list")
        .iter()
        .map(|v| v.as_u64().expect("id") as u32)
        .collect()
}

fn ids_rows(t: &Tensor) -> Vec<Vec<u32>> {
    t.to_dtype(DType::I64)
        .unwrap()
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|row| row.into_iter().map(|id| id as u32).collect())
        .collect()
}

fn ids_tensor(ids: &[u32]) -> Tensor {
    Tensor::from_slice(ids, (1, ids.len()), &Device::Cpu).unwrap()
}

/// The text tower of the fixture checkpoint, sized from the YAML's `arch` (resolved through the
/// `<arch>.json` beside it); also checks that every text key was consumed.
fn fixture_encoder(checkpoint: &str) -> (TextEncoder, TextConfig) {
    fixture_encoder_on(checkpoint, DType::F32, &Device::Cpu)
}

fn fixture_encoder_on(
    checkpoint: &str,
    dtype: DType,
    device: &Device,
) -> (TextEncoder, TextConfig) {
    let yaml_path = common::fixture("stablesr/config.yaml");
    let base = BaseModelConfig::from_yaml_file(&yaml_path).expect("fixture config");
    let store = Arc::new(TensorStore::open(&common::fixture(checkpoint)).expect("checkpoint"));
    let cfg = base.text.clone();
    let weights = CheckedWeights::from_store(store);
    let vb = weights.var_builder(dtype, device).pp(TEXT_PREFIX);
    let encoder = TextEncoder::new(&cfg, vb).expect("text encoder");
    let prefix = format!("{TEXT_PREFIX}.");
    let report = weights
        .finish(&[prefix.as_str()])
        .expect("text weights match the configuration");
    assert!(
        report.unused.is_empty(),
        "text keys not consumed: {:?}",
        report.unused
    );
    (encoder, cfg)
}

#[test]
fn tokenizer_matches_open_clip_except_documented_cases() {
    let tok = tokenizer();
    let cases = read_json("tokenizer/tokens.json");
    let verify = read_json("tokenizer/verify.json");
    let known: BTreeMap<String, Vec<u32>> = verify["mismatches"]
        .as_array()
        .expect("mismatches")
        .iter()
        .map(|m| {
            (
                m["text"].as_str().unwrap().to_string(),
                json_ids(&m["tokenizer_json"]),
            )
        })
        .collect();
    let mut mismatched = BTreeSet::new();
    let cases = cases["cases"].as_array().expect("cases");
    assert!(!cases.is_empty());
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let ids = tok.encode(text).unwrap();
        assert_eq!(ids.len(), CONTEXT_LENGTH, "{text:?}");
        if ids != json_ids(&case["ids"]) {
            mismatched.insert(text.to_string());
            // A documented difference must still be the one the Python `tokenizers` gave.
            if let Some(expected) = known.get(text) {
                assert_eq!(&ids, expected, "{text:?}: differs from tokenizers (Python)");
            }
        }
    }
    let known: BTreeSet<String> = known.into_keys().collect();
    assert_eq!(
        mismatched, known,
        "strings whose ids differ from open_clip vs the documented unfixable ones"
    );
    println!(
        "{} strings, {} documented mismatches",
        cases.len(),
        mismatched.len()
    );
}

#[test]
fn tokenizer_from_file_equals_bundled() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/tokenizer.json");
    let from_file = ClipTokenizer::from_file(&path).unwrap();
    let bundled = tokenizer();
    for text in [POSITIVE, NEGATIVE, "", "*"] {
        assert_eq!(
            from_file.encode(text).unwrap(),
            bundled.encode(text).unwrap()
        );
    }
    assert!(ClipTokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).is_err());
}

#[test]
fn tokenizer_truncates_keeping_end_token() {
    let tok = tokenizer();
    let a = tok.token_id("a</w>").expect("a</w> in vocabulary");
    // open_clip: the first 77 of [start, 100 x a, end], then the last one becomes the end token.
    let ids = tok.encode(&["a"; 100].join(" ")).unwrap();
    assert_eq!(ids.len(), CONTEXT_LENGTH);
    assert_eq!(ids[0], START_ID);
    assert!(ids[1..CONTEXT_LENGTH - 1].iter().all(|&id| id == a));
    assert_eq!(ids[CONTEXT_LENGTH - 1], END_ID);
    assert_eq!(eot_position(&ids).unwrap(), CONTEXT_LENGTH - 1);

    let empty = tok.encode("").unwrap();
    assert_eq!(&empty[..2], &[START_ID, END_ID]);
    assert!(empty[2..].iter().all(|&id| id == PAD_ID));
    assert_eq!(eot_position(&empty).unwrap(), 1);
    assert!(eot_position(&[START_ID, 320, PAD_ID]).is_err());
}

#[test]
fn io_tokens_are_the_prompts() {
    let io = common::load("stablesr/io.safetensors");
    let rows = ids_rows(common::get(&io, "text.tokens"));
    let tok = tokenizer();
    let expected: Vec<Vec<u32>> = [POSITIVE, NEGATIVE, ""]
        .iter()
        .map(|p| tok.encode(p).unwrap())
        .collect();
    assert_eq!(rows, expected);
}

fn check_encoder_against_io(checkpoint: &str) {
    // Device and precision from PFSTORER_TEST_DEVICE / PFSTORER_TEST_DTYPE (default CPU f32).
    let (encoder, cfg) =
        fixture_encoder_on(checkpoint, common::test_dtype(), &common::test_device());
    let io = common::load("stablesr/io.safetensors");
    let tokens = &common::input(&io, "text.tokens");
    let emb = encoder.token_embeddings(tokens).unwrap();
    let states = encoder.hidden_states(&emb).unwrap();
    assert_eq!(states.len(), cfg.layers + 1);
    let mut worst = common::assert_module_close(
        &format!("{checkpoint} embed_plus_pos"),
        &states[0],
        common::get(&io, "text.debug.embed_plus_pos"),
    );
    let debug_blocks = io
        .keys()
        .filter(|k| k.starts_with("text.debug.block"))
        .count();
    assert_eq!(debug_blocks, cfg.layers, "one debug tensor per block");
    for (i, state) in states[1..].iter().enumerate() {
        let name = format!("text.debug.block{i}_out");
        let err = common::assert_module_close(
            &format!("{checkpoint} {name}"),
            state,
            common::get(&io, &name),
        );
        worst = worst.max(err);
    }
    let out = encoder.forward(tokens).unwrap();
    let err = common::assert_module_close(
        &format!("{checkpoint} text.embeddings"),
        &out,
        common::get(&io, "text.embeddings"),
    );
    println!("{checkpoint}: worst {:.3e}", worst.max(err));
}

#[test]
fn text_encoder_matches_reference_safetensors() {
    check_encoder_against_io("stablesr/model.safetensors");
}

#[test]
fn text_encoder_matches_reference_ckpt() {
    check_encoder_against_io("stablesr/model.ckpt");
}

#[test]
fn text_gradient_matches_reference() {
    let _training = DifferentiableScope::enter(true);
    let (encoder, _) = fixture_encoder("stablesr/model.safetensors");
    let grad = common::load("stablesr/grad.safetensors");
    let tokens = common::get(&grad, "text.in.tokens");
    let leaf = common::get(&grad, "text.in.token_embeddings");
    common::assert_module_close(
        "token_embeddings(text.in.tokens)",
        &encoder.token_embeddings(tokens).unwrap(),
        leaf,
    );

    let emb = Var::from_tensor(leaf).unwrap();
    let context = encoder.forward_embeddings(emb.as_tensor()).unwrap();
    common::assert_module_close(
        "text.out.context",
        &context,
        common::get(&grad, "text.out.context"),
    );
    let weight = common::get(&grad, "text.weight.R");
    let loss = (&context * weight).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let d_emb = grads
        .get(emb.as_tensor())
        .expect("gradient reaches the embeddings");
    common::assert_gradient_close(
        "text.grad.token_embeddings",
        d_emb,
        common::get(&grad, "text.grad.token_embeddings"),
    );
}

#[test]
fn placeholder_positions_follow_the_spec() {
    let tok = tokenizer();
    assert_eq!(tok.token_id("*</w>"), Some(265));
    let (ids, positions) = tok.encode_with_placeholder(POSITIVE, "*").unwrap();
    assert_eq!(positions, vec![4]);
    assert_eq!(ids[4], 265);
    assert_eq!(eot_position(&ids).unwrap(), 17);
    // The literal prompt merges `*,` into one token, which is why the spaces are needed.
    assert!(!tok.encode(POSITIVE).unwrap().contains(&265));
    assert!(tok.encode_with_placeholder(NEGATIVE, "*").is_err());
    assert_eq!(eot_position(&tok.encode(NEGATIVE).unwrap()).unwrap(), 15);
}

#[test]
fn replaced_row_receives_the_reference_gradient() {
    let _training = DifferentiableScope::enter(true);
    let (encoder, _) = fixture_encoder("stablesr/model.safetensors");
    let grad = common::load("stablesr/grad.safetensors");
    let tokens = common::get(&grad, "text.in.tokens");

    // The reference's first row is the positive prompt with `*` as its own token.
    let tok = tokenizer();
    let (ids, positions) = tok.encode_with_placeholder(POSITIVE, "*").unwrap();
    assert_eq!(ids_rows(tokens)[0], ids, "text.in.tokens[0]");
    let position = positions[0];

    let emb = encoder.token_embeddings(tokens).unwrap();
    let row = Var::from_tensor(&emb.i((0, position)).unwrap()).unwrap();
    let replaced = replace_rows(&emb, &[(0, position)], row.as_tensor()).unwrap();
    common::assert_close("replace_rows with the same row", &replaced, &emb, 0.0, 0.0);

    let context = encoder.forward_embeddings(&replaced).unwrap();
    let weight = common::get(&grad, "text.weight.R");
    let loss = (&context * weight).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let d_row = grads
        .get(row.as_tensor())
        .expect("gradient reaches the row");
    let full = common::get(&grad, "text.grad.token_embeddings");
    let expected = full.i((0, position)).unwrap();
    // The bound of the whole gradient tensor (its absolute part scales with the tensor's max).
    let (atol, rtol) = common::gradient_tolerance(full);
    common::assert_close("d loss / d row", d_row, &expected, atol, rtol);

    // A different row (here another token's embedding; a constant shift would be invisible
    // through the layer norms) changes only the context at and after the placeholder.
    let other = emb.i((0, 1)).unwrap();
    let changed = encoder
        .forward_embeddings(&replace_rows(&emb, &[(0, position)], &other).unwrap())
        .unwrap();
    let before = |t: &Tensor| t.i((0, ..position)).unwrap();
    common::assert_close(
        "context before the placeholder",
        &before(&changed),
        &before(&context),
        0.0,
        0.0,
    );
    let after_diff = common::max_abs_diff(
        &changed.i((0, position)).unwrap(),
        &context.i((0, position)).unwrap(),
    );
    assert!(after_diff > 1e-3, "placeholder row has no effect");
    assert!(replace_rows(&emb, &[(5, 0)], row.as_tensor()).is_err());
}

#[test]
fn layer_choice_changes_the_output() {
    let (penultimate, cfg) = fixture_encoder("stablesr/model.safetensors");
    let store =
        Arc::new(TensorStore::open(&common::fixture("stablesr/model.safetensors")).unwrap());
    let build = |skip: usize| {
        let cfg = TextConfig {
            skip_last_layers: skip,
            ..cfg.clone()
        };
        let weights = CheckedWeights::from_store(store.clone());
        TextEncoder::new(
            &cfg,
            weights
                .var_builder(DType::F32, &Device::Cpu)
                .pp(TEXT_PREFIX),
        )
    };
    let last = build(0).unwrap();
    assert!(build(cfg.layers + 1).is_err());
    let ids = ids_tensor(&tokenizer().encode(NEGATIVE).unwrap());
    let diff = common::max_abs_diff(
        &penultimate.forward(&ids).unwrap(),
        &last.forward(&ids).unwrap(),
    );
    assert!(diff > 1e-3, "\"last\" and \"penultimate\" agree: {diff}");
}

#[test]
fn full_size_tower_requests_the_manifest_keys() {
    let manifest = read_json("manifests/face_stablesr.json");
    let prefix = format!("{TEXT_PREFIX}.");
    let expected: BTreeMap<String, Vec<usize>> = manifest["keys"]
        .as_array()
        .expect("keys")
        .iter()
        .filter(|k| k["key"].as_str().unwrap().starts_with(&prefix))
        .map(|k| {
            let shape = k["shape"]
                .as_array()
                .unwrap()
                .iter()
                .map(|d| d.as_u64().unwrap() as usize)
                .collect();
            (k["key"].as_str().unwrap().to_string(), shape)
        })
        .collect();
    assert!(!expected.is_empty());
    let weights = CheckedWeights::shapes_only();
    let vb = weights
        .var_builder(DType::F32, &Device::Cpu)
        .pp(TEXT_PREFIX);
    let cfg = TextConfig::from_arch("ViT-H-14").unwrap();
    TextEncoder::new(&cfg, vb).unwrap();
    assert_eq!(weights.requested(), expected);
}
