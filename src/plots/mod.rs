//! Figures and tables of the paper's sections 3-4, as interactive plotly figures that render
//! with no network: every HTML this module writes or prints carries plotly.js inline.
//!
//! - [`Figure`]: a named plotly plot; `write_html` (a standalone page), `notebook_html` (one
//!   fragment for a notebook cell) and `evcxr_display` (evcxr's rich-output protocol).
//! - [`figures`]: one builder per paper figure (Figs. 1-5 and the section 3.2 fit overlays).
//! - [`toy`]: the toy-MDP figures (section 4, Appendices D-E).
//! - [`table`]: [`Table`], small HTML / CSV tables for notebooks.
//! - [`report`]: [`write_report`], every figure, the analysis tables and claims.json at once.
//!
//! Builders never panic on missing data: empty or non-finite inputs give a valid figure whose
//! title says what was missing.
//!
//! Stage order: this module reads `analysis` and `toy_mdp`; only `sweep`, `cli` and notebook
//! code import it.

pub mod figures;
pub mod report;
pub mod table;
pub mod toy;

pub use figures::{
    fig1_checkpoints, fig1_end_of_epoch, fig2_intra_epoch, fig3_length_r2, fig3_length_r2_ordered,
    fig3_rdpo, fig4_metrics, fig5_likelihood, fig5_likelihood_without_beta, fit_overlays,
};
pub use report::{ReportFiles, report_figures, toy_summaries, write_report};
pub use table::Table;
pub use toy::toy_mdp_figures;

use anyhow::Result;
use plotly::common::{Anchor, Font};
use plotly::layout::{Annotation, Axis, AxisType, Legend, Margin};
use plotly::{Layout, Plot};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

/// A named figure. `name` is the file stem (`<name>.html`), `title` the heading shown above the
/// plot (also set in the plot's layout by the builders).
#[derive(Clone)]
pub struct Figure {
    pub name: String,
    pub title: String,
    pub plot: Plot,
}

impl std::fmt::Debug for Figure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Figure")
            .field("name", &self.name)
            .field("title", &self.title)
            .field("traces", &self.plot.data().len())
            .finish()
    }
}

impl Figure {
    /// The file name `write_html` uses: the name with every character outside
    /// `[A-Za-z0-9._-]` replaced by `_`, plus `.html`.
    pub fn file_name(&self) -> String {
        format!("{}.html", sanitize(&self.name))
    }

    /// Number of traces in the plot.
    pub fn n_traces(&self) -> usize {
        self.plot.data().len()
    }

    /// A complete HTML page: plotly.js inline in the head, the plot in the body. No script is
    /// loaded from the network, and the page is the same bytes every time for the same figure.
    pub fn standalone_html(&self) -> String {
        let div = self
            .plot
            .to_inline_html(Some(&format!("overopt-{}", sanitize(&self.name))));
        format!(
            "<!doctype html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
             <title>{}</title>\n{}\n</head>\n<body>\n{}\n</body>\n</html>\n",
            escape_html(&self.title),
            plotly_js_script(),
            div
        )
    }

    /// Write `dir/<file_name()>` atomically (creating `dir`) and return its path.
    pub fn write_html(&self, dir: &Path) -> Result<PathBuf> {
        let path = dir.join(self.file_name());
        crate::util::write_atomic(&path, self.standalone_html().as_bytes())?;
        Ok(path)
    }

    /// One HTML fragment for a notebook output: a `<script>` with plotly.js, then the plot's
    /// div (with an id unique to this call) and the script that draws it. It needs no network,
    /// so it renders in JupyterLab offline and in nbconvert's HTML export.
    pub fn notebook_html(&self) -> String {
        let id = unique_div_id(&self.name);
        format!(
            "{}\n{}",
            plotly_js_script(),
            self.plot.to_inline_html(Some(&id))
        )
    }

    /// Print the figure in evcxr's rich-output protocol as `text/html`. evcxr keeps only the
    /// last block of each mime type in a cell: show one figure per cell.
    pub fn evcxr_display(&self) {
        println!(
            "EVCXR_BEGIN_CONTENT text/html\n{}\nEVCXR_END_CONTENT",
            self.notebook_html()
        );
    }
}

/// The `<script>` element holding plotly.js, taken from `Plot::offline_js_sources()` (which also
/// holds MathJax; the figures use no LaTeX, so only plotly.js is kept). If that string ever
/// stops starting with plotly.js, all of it is used.
pub fn plotly_js_script() -> &'static str {
    static JS: OnceLock<String> = OnceLock::new();
    JS.get_or_init(|| {
        let all = Plot::offline_js_sources();
        const END: &str = "</script>";
        match all.find(END) {
            Some(i) if all[..i].contains("plotly.js") => all[..i + END.len()].to_string(),
            _ => all,
        }
    })
}

fn unique_div_id(name: &str) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    format!(
        "overopt-{}-{}-{t:x}-{n}",
        sanitize(name),
        std::process::id()
    )
}

/// Replace every character outside `[A-Za-z0-9._-]` by `_` (empty input: `figure`).
pub(crate) fn sanitize(name: &str) -> String {
    if name.is_empty() {
        return "figure".into();
    }
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Escape text for HTML element content and attribute values.
pub fn escape_html(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// A number for labels and tables: 4 significant digits, trailing zeros dropped, scientific
/// notation outside [1e-3, 1e6); empty when not finite.
pub fn fmt_num(x: f64) -> String {
    if !x.is_finite() {
        return String::new();
    }
    if x == 0.0 {
        return "0".into();
    }
    let a = x.abs();
    if !(1e-3..1e6).contains(&a) {
        return format!("{x:.3e}");
    }
    let digits = (3 - a.log10().floor() as i32).max(0) as usize;
    let s = format!("{x:.digits$}");
    if s.contains('.') {
        s.trim_end_matches('0').trim_end_matches('.').to_string()
    } else {
        s
    }
}

// ---------------------------------------------------------------------------------------------
// Panels: subplots laid out by explicit axis domains.

/// Most panels one figure can hold: the typed plotly layout has 8 x/y axis pairs.
pub const MAX_PANELS: usize = 8;

/// One subplot.
#[derive(Debug, Clone, Default)]
pub(crate) struct Panel {
    pub title: String,
    pub x_title: String,
    pub y_title: String,
    pub x_log: bool,
    /// A fixed y range (auto-range when `None`).
    pub y_range: Option<(f64, f64)>,
}

impl Panel {
    pub fn new(title: impl Into<String>, x_title: &str, y_title: &str) -> Self {
        Panel {
            title: title.into(),
            x_title: x_title.into(),
            y_title: y_title.into(),
            x_log: false,
            y_range: None,
        }
    }
}

/// A grid of at most `MAX_PANELS` panels, filled row by row.
#[derive(Debug, Clone)]
pub(crate) struct Grid {
    pub cols: usize,
    pub panels: Vec<Panel>,
}

impl Grid {
    /// `panels` beyond `MAX_PANELS` are dropped; the second value says how many. No panels:
    /// one blank panel, so that an empty figure still has axes.
    pub fn new(cols: usize, mut panels: Vec<Panel>) -> (Grid, usize) {
        let dropped = panels.len().saturating_sub(MAX_PANELS);
        panels.truncate(MAX_PANELS);
        if panels.is_empty() {
            panels.push(Panel::default());
        }
        let cols = cols.clamp(1, panels.len().max(1));
        (Grid { cols, panels }, dropped)
    }

    pub fn rows(&self) -> usize {
        self.panels.len().div_ceil(self.cols).max(1)
    }

    /// The x and y axis names a trace in panel `k` refers to (`x`, `y`, `x2`, `y2`, ...).
    pub fn axes(k: usize) -> (String, String) {
        if k == 0 {
            ("x".into(), "y".into())
        } else {
            (format!("x{}", k + 1), format!("y{}", k + 1))
        }
    }

    fn domains(&self, k: usize) -> ([f64; 2], [f64; 2]) {
        let (rows, cols) = (self.rows(), self.cols);
        let (hg, vg) = (
            0.07,
            if rows > 1 {
                0.16 / rows as f64 * 2.0
            } else {
                0.0
            },
        );
        let w = (1.0 - hg * (cols - 1) as f64) / cols as f64;
        let h = (1.0 - vg * (rows - 1) as f64) / rows as f64;
        let (r, c) = (k / cols, k % cols);
        let x0 = c as f64 * (w + hg);
        let y1 = 1.0 - r as f64 * (h + vg);
        ([x0, x0 + w], [y1 - h, y1])
    }

    /// A layout with the figure title, one x/y axis pair per panel and the panel titles.
    pub fn layout(&self, title: &str) -> Layout {
        let rows = self.rows();
        let mut layout = Layout::new()
            .title(title)
            .height(120 + 340 * rows)
            .margin(Margin::new().top(90).bottom(60).left(70).right(30))
            .legend(Legend::new().font(Font::new().size(11)))
            .show_legend(true);
        let mut notes = Vec::new();
        for (k, p) in self.panels.iter().enumerate() {
            let (xd, yd) = self.domains(k);
            let (xn, yn) = Self::axes(k);
            let mut xa = Axis::new()
                .domain(&xd)
                .anchor(&yn)
                .title(p.x_title.as_str())
                .zero_line(false);
            if p.x_log {
                xa = xa.type_(AxisType::Log);
            }
            let mut ya = Axis::new()
                .domain(&yd)
                .anchor(&xn)
                .title(p.y_title.as_str())
                .zero_line(false);
            if let Some((lo, hi)) = p.y_range {
                ya = ya.range(vec![lo, hi]);
            }
            layout = set_axes(layout, k, xa, ya);
            if !p.title.is_empty() {
                notes.push(
                    Annotation::new()
                        .text(format!("<b>{}</b>", escape_html(&p.title)))
                        .x_ref("paper")
                        .y_ref("paper")
                        .x(0.5 * (xd[0] + xd[1]))
                        .y(yd[1])
                        .x_anchor(Anchor::Center)
                        .y_anchor(Anchor::Bottom)
                        .y_shift(4.0)
                        .show_arrow(false)
                        .font(Font::new().size(13)),
                );
            }
        }
        if !notes.is_empty() {
            layout = layout.annotations(notes);
        }
        layout
    }
}

fn set_axes(layout: Layout, k: usize, x: Axis, y: Axis) -> Layout {
    match k {
        0 => layout.x_axis(x).y_axis(y),
        1 => layout.x_axis2(x).y_axis2(y),
        2 => layout.x_axis3(x).y_axis3(y),
        3 => layout.x_axis4(x).y_axis4(y),
        4 => layout.x_axis5(x).y_axis5(y),
        5 => layout.x_axis6(x).y_axis6(y),
        6 => layout.x_axis7(x).y_axis7(y),
        7 => layout.x_axis8(x).y_axis8(y),
        _ => layout,
    }
}

/// A title with notes about missing data appended in parentheses.
pub(crate) fn titled(base: &str, notes: &[String]) -> String {
    if notes.is_empty() {
        base.to_string()
    } else {
        format!("{base} ({})", notes.join("; "))
    }
}

// ---------------------------------------------------------------------------------------------
// Colours.

const SIZE_COLOURS: [&str; 8] = [
    "#d1495b", "#2e86ab", "#3c9d4e", "#8d5fbf", "#e08e1b", "#5c6b73", "#b5651d", "#17a2b8",
];

/// Colour of the i-th size (sizes ordered smallest first).
pub(crate) fn size_colour(i: usize) -> &'static str {
    SIZE_COLOURS[i % SIZE_COLOURS.len()]
}

/// Colour of position i of n on a ramp from light orange to dark blue (betas: small to large).
pub(crate) fn ramp_colour(i: usize, n: usize) -> String {
    let t = if n <= 1 {
        0.5
    } else {
        i as f64 / (n - 1) as f64
    };
    let (a, b) = ([240.0, 160.0, 40.0], [30.0, 50.0, 130.0]);
    let c: Vec<u8> = (0..3)
        .map(|j| (a[j] + t * (b[j] - a[j])).round() as u8)
        .collect();
    format!("#{:02x}{:02x}{:02x}", c[0], c[1], c[2])
}

/// Sizes ordered by a guess from their names alone: a parameter count such as `70m`, `2.8b`
/// or `30k` when one parses, then common words (tiny < small < base < medium < large < xl),
/// then alphabetically.
pub fn order_sizes_by_name(sizes: impl IntoIterator<Item = String>) -> Vec<String> {
    let words = ["tiny", "small", "base", "medium", "large", "xl"];
    let key = |s: &str| -> (u8, f64, String) {
        let l = s.to_ascii_lowercase();
        let mult = match l.chars().last() {
            Some('k') => Some(1e3),
            Some('m') => Some(1e6),
            Some('b') => Some(1e9),
            _ => None,
        };
        if let Some(m) = mult
            && let Ok(v) = l[..l.len() - 1].parse::<f64>()
        {
            return (0, v * m, l);
        }
        if let Some(i) = words.iter().position(|w| *w == l) {
            return (1, i as f64, l);
        }
        (2, 0.0, l)
    };
    let mut v: Vec<String> = sizes.into_iter().collect();
    v.sort();
    v.dedup();
    v.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0)
            .then(ka.1.total_cmp(&kb.1))
            .then(ka.2.cmp(&kb.2))
            .then(a.cmp(b))
    });
    v
}

#[cfg(test)]
mod tests;
