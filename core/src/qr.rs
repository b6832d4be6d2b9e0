//! QR codes of share links: as text for terminals (two rows of modules per
//! line of half blocks) and as a module matrix (the dashboard's PNG).

use qrcode::{Color, EcLevel, QrCode};

/// A QR code of `data` as lines of Unicode half blocks, dark on a light
/// terminal or light on a dark one (with its quiet zone); `None` if `data`
/// is too long for a QR code.
pub fn text(data: &str) -> Option<String> {
    let code = QrCode::with_error_correction_level(data.as_bytes(), EcLevel::L).ok()?;
    Some(
        code.render::<qrcode::render::unicode::Dense1x2>()
            .quiet_zone(true)
            .build(),
    )
}

/// The modules of a QR code of `data`: its width and, row by row,
/// whether each is dark (no quiet zone).
pub fn modules(data: &str) -> Option<(usize, Vec<bool>)> {
    let code = QrCode::with_error_correction_level(data.as_bytes(), EcLevel::L).ok()?;
    let width = code.width();
    let dark = code
        .into_colors()
        .into_iter()
        .map(|c| c == Color::Dark)
        .collect();
    Some((width, dark))
}

/// A QR code of `data` as a PNG: `scale` pixels per module, a 4-module
/// quiet zone, black on white.
pub fn png(data: &str, scale: usize) -> Option<Vec<u8>> {
    let (width, dark) = modules(data)?;
    let scale = scale.max(1);
    let quiet = 4;
    let side = (width + 2 * quiet) * scale;
    let mut pixels = vec![255u8; side * side];
    for (i, d) in dark.iter().enumerate() {
        if !*d {
            continue;
        }
        let (mx, my) = (i % width + quiet, i / width + quiet);
        for y in my * scale..(my + 1) * scale {
            for x in mx * scale..(mx + 1) * scale {
                if let Some(px) = pixels.get_mut(y * side + x) {
                    *px = 0;
                }
            }
        }
    }
    let mut out = Vec::new();
    {
        let side = u32::try_from(side).ok()?;
        let mut enc = ::png::Encoder::new(&mut out, side, side);
        enc.set_color(::png::ColorType::Grayscale);
        enc.set_depth(::png::BitDepth::Eight);
        let mut w = enc.write_header().ok()?;
        w.write_image_data(&pixels).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    #[test]
    fn a_link_fits_and_renders() {
        let url = format!(
            "https://myapp.example.org:8443/__kennel/link/{}",
            "a".repeat(64)
        );
        let (w, m) = super::modules(&url).unwrap();
        assert_eq!(m.len(), w * w);
        let t = super::text(&url).unwrap();
        assert!(t.lines().count() > w / 2);
        assert!(super::text(&"x".repeat(10_000)).is_none());
        let png = super::png(&url, 4).unwrap();
        assert_eq!(png.get(1..4), Some(&b"PNG"[..]));
    }
}
