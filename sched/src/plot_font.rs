//! The one font both simulators' PNG plots use for their labels (std only).
//!
//! Design: DejaVu Sans is read at run time from the usual Debian path and registered with plotters once per
//! process; without it a plot is drawn without text rather than failing the run.

use plotters::style::FontStyle;

/// Font used for plot labels when present.
pub const FONT_PATH: &str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf";

/// Registers [`FONT_PATH`] as plotters' "sans-serif" (first call only); true if labels can be drawn.
pub fn load() -> bool {
    use std::sync::OnceLock;
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| match std::fs::read(FONT_PATH) {
        Ok(bytes) => {
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok()
        }
        Err(_) => false,
    })
}
