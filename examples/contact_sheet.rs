//! Renders `assets/degrade-contact-sheet.png`: the astronaut portrait (left column) next to four
//! light (top row) and four heavy (bottom row) degradations, seeds 1 to 4.
//!
//! `cargo run --example contact_sheet [INPUT] [OUTPUT]`

use pfstorer::degrade::{degrade_image, Preset};
use pfstorer::imaging::io::{load_image, save_png};
use pfstorer::imaging::ImageF32;

const SEEDS: [u64; 4] = [1, 2, 3, 4];
/// White gap between tiles, in pixels.
const GAP: usize = 4;

fn paste(sheet: &mut ImageF32, tile: &ImageF32, column: usize, row: usize) {
    let x0 = column * (tile.width + GAP);
    let y0 = row * (tile.height + GAP);
    for y in 0..tile.height {
        for x in 0..tile.width {
            for c in 0..3 {
                *sheet.at_mut(x0 + x, y0 + y, c) = tile.at(x, y, c);
            }
        }
    }
}

fn main() -> pfstorer::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let input = args.first().map_or("assets/astronaut.png", String::as_str);
    let output = args
        .get(1)
        .map_or("assets/degrade-contact-sheet.png", String::as_str);
    let original = load_image(input)?.rgb;
    let (w, h) = (original.width, original.height);
    let columns = 1 + SEEDS.len();
    let mut sheet = ImageF32::new(
        columns * w + (columns - 1) * GAP,
        2 * h + GAP,
        3,
        vec![1.0; (columns * w + (columns - 1) * GAP) * (2 * h + GAP) * 3],
    );
    for (row, preset) in [Preset::Light, Preset::Heavy].into_iter().enumerate() {
        paste(&mut sheet, &original, 0, row);
        for (i, &seed) in SEEDS.iter().enumerate() {
            let (degraded, _) = degrade_image(&original, preset, seed)?;
            paste(&mut sheet, &degraded, i + 1, row);
        }
    }
    let text = [(
        "Description".to_string(),
        format!(
            "pfstorer degrade contact sheet: original, then seeds {SEEDS:?}; top row light, bottom row heavy"
        ),
    )];
    save_png(output, &sheet, None, false, &text, true)?;
    println!("wrote {output}");
    Ok(())
}
