//! PNG copies of the report's SVG charts (resvg). Text needs a system font; without one the
//! PNG still has the curves and axes, and the SVG next to it has everything.

use std::path::Path;

use anyhow::Context;
use resvg::{tiny_skia, usvg};

/// Rasterizes `svg` at twice its size into `path`.
pub fn write_png(svg: &str, path: &Path) -> anyhow::Result<()> {
    let mut options = usvg::Options::default();
    let fonts = options.fontdb_mut();
    fonts.load_system_fonts();
    // The charts ask for the generic `sans-serif`; map it to a font this machine has.
    let family = [
        "DejaVu Sans",
        "Liberation Sans",
        "Noto Sans",
        "Arial",
        "Helvetica",
    ]
    .into_iter()
    .find(|name| {
        fonts
            .faces()
            .any(|face| face.families.iter().any(|(family, _)| family == name))
    })
    .map(str::to_owned)
    .or_else(|| {
        fonts
            .faces()
            .next()
            .and_then(|face| face.families.first().map(|(family, _)| family.clone()))
    });
    if let Some(family) = family {
        fonts.set_sans_serif_family(family);
    }
    let tree = usvg::Tree::from_str(svg, &options).context("parsing the chart SVG")?;
    let size = tree.size();
    let scale = 2.0;
    let (width, height) = (
        (size.width() * scale).ceil() as u32,
        (size.height() * scale).ceil() as u32,
    );
    let mut pixmap = tiny_skia::Pixmap::new(width, height).context("allocating the PNG canvas")?;
    pixmap.fill(tiny_skia::Color::WHITE);
    resvg::render(
        &tree,
        tiny_skia::Transform::from_scale(scale, scale),
        &mut pixmap.as_mut(),
    );
    pixmap
        .save_png(path)
        .with_context(|| format!("writing {}", path.display()))
}
