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
    }
}
