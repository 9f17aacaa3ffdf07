//! Line charts as inline SVG, written by hand so report.html needs nothing from the
//! network: axes with "nice" ticks (linear or log10), grid lines, one `<polyline>` per
//! line (broken where samples are missing), shaded and labelled bands (fault windows),
//! dashed vertical markers (load start / end), and a legend. Every chart is an `<svg
//! class="chart" data-chart="<name>">`; a chart without data is a small SVG saying so.

use std::fmt::Write as _;

use crate::text::escape_xml;

/// Line colours: Tableau 10 without its red (which marks faults), then lighter tints.
const PALETTE: [&str; 16] = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
    "#17becf", "#222222", "#aec7e8", "#ffbb78", "#98df8a", "#c5b0d5", "#c49c94", "#f7b6d2",
];
const FAULT_FILL: &str = "#d62728";

const WIDTH: f64 = 960.0;
const PLOT_HEIGHT: f64 = 260.0;
const LEFT: f64 = 72.0;
const RIGHT: f64 = 24.0;
const TOP: f64 = 40.0;
const X_AXIS_SPACE: f64 = 44.0;
const LEGEND_ROW: f64 = 18.0;
const CHAR_W: f64 = 6.6;

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Scale {
    Linear,
    /// log10; values <= 0 are drawn at the bottom of the axis.
    Log,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum XKind {
    /// Seconds since the run's origin.
    Time,
    /// Percentiles 50 .. 99.99 on a `-log10(1 - p/100)` axis.
    Percentile,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    pub label: String,
    pub points: Vec<(f64, f64)>,
    pub dashed: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Band {
    pub from: f64,
    pub to: f64,
    pub label: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Marker {
    pub x: f64,
    pub label: String,
}

#[derive(Debug, Clone)]
pub struct Chart {
    /// The `data-chart` attribute: unique in the page, `[a-z0-9_]`.
    pub name: String,
    /// Shown as the SVG's `<title>` (the page has a heading of its own).
    pub title: String,
    pub x_label: String,
    pub y_label: String,
    pub x_kind: XKind,
    pub y_scale: Scale,
    /// The x domain; computed from the data when `None`.
    pub x_range: Option<(f64, f64)>,
    pub lines: Vec<Line>,
    pub bands: Vec<Band>,
    pub markers: Vec<Marker>,
    /// Why there is no data, for the note drawn instead of an empty chart.
    pub empty_note: String,
}

impl Chart {
    pub fn new(name: &str, title: &str, x_kind: XKind, y_label: &str) -> Chart {
        Chart {
            name: name.into(),
            title: title.into(),
            x_label: match x_kind {
                XKind::Time => "seconds since the start of the run".into(),
                XKind::Percentile => "percentile".into(),
            },
            y_label: y_label.into(),
            x_kind,
            y_scale: Scale::Linear,
            x_range: None,
            lines: Vec::new(),
            bands: Vec::new(),
            markers: Vec::new(),
            empty_note: "no data".into(),
        }
    }

    pub fn has_data(&self) -> bool {
        self.lines.iter().any(|l| !l.points.is_empty())
    }
}

/// Percentile → the x coordinate of the percentile axis.
fn pct_x(p: f64) -> f64 {
    -(1.0 - (p / 100.0).min(0.999_999)).log10()
}

/// Steps of 1, 2, 2.5 or 5 times a power of ten giving about `target` intervals.
pub fn nice_step(range: f64, target: f64) -> f64 {
    if range <= 0.0 || !range.is_finite() {
        return 1.0;
    }
    let raw = range / target.max(1.0);
    let mag = 10f64.powf(raw.log10().floor());
    let norm = raw / mag;
    let nice = if norm <= 1.0 {
        1.0
    } else if norm <= 2.0 {
        2.0
    } else if norm <= 2.5 {
        2.5
    } else if norm <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

/// Ticks covering `[lo, hi]` at a nice step; the domain is widened to whole steps.
pub fn linear_ticks(lo: f64, hi: f64, target: f64) -> (f64, f64, Vec<f64>) {
    let (lo, hi) = if hi - lo <= f64::EPSILON * hi.abs().max(1.0) {
        (
            lo - 0.5_f64.max(lo.abs() * 0.1),
            hi + 0.5_f64.max(hi.abs() * 0.1),
        )
    } else {
        (lo, hi)
    };
    let step = nice_step(hi - lo, target);
    let start = (lo / step).floor() * step;
    let end = (hi / step).ceil() * step;
    let mut ticks = Vec::new();
    let mut i = 0.0;
    loop {
        let v = start + i * step;
        if v > end + step * 1e-9 || ticks.len() > 50 {
            break;
        }
        ticks.push(if v.abs() < step * 1e-9 { 0.0 } else { v });
        i += 1.0;
    }
    (start, end, ticks)
}

/// The largest 1, 2 or 5 × 10^k at most `v` (`up`: the smallest at least `v`).
fn one_two_five(v: f64, up: bool) -> f64 {
    let e = v.log10().floor();
    let base = 10f64.powf(e);
    let steps = [1.0, 2.0, 5.0, 10.0];
    if up {
        steps
            .iter()
            .map(|m| m * base)
            .find(|c| *c >= v * (1.0 - 1e-9))
            .unwrap_or(10.0 * base)
    } else {
        steps
            .iter()
            .rev()
            .map(|m| m * base)
            .find(|c| *c <= v * (1.0 + 1e-9))
            .unwrap_or(base)
    }
}

/// A log10 domain covering `[lo, hi]` (both > 0), bounded at 1, 2 or 5 × 10^k, with ticks at
/// 1, 2, 5 × 10^k when it spans few decades, else at powers of ten.
pub fn log_ticks(lo: f64, hi: f64) -> (f64, f64, Vec<f64>) {
    let a = one_two_five(lo, false);
    let mut b = one_two_five(hi, true);
    if b <= a {
        b = one_two_five(a * 1.5, true);
    }
    let decades = (b / a).log10();
    let mults: &[f64] = if decades <= 3.5 {
        &[1.0, 2.0, 5.0]
    } else {
        &[1.0]
    };
    let mut ticks = Vec::new();
    let mut e = a.log10().floor();
    while e <= b.log10().ceil() {
        for m in mults {
            let v = m * 10f64.powf(e);
            if v >= a * (1.0 - 1e-9) && v <= b * (1.0 + 1e-9) {
                ticks.push(v);
            }
        }
        e += 1.0;
    }
    (a, b, ticks)
}

/// A tick label: compact (`1.5k`, `2M`) with as many decimals as the step needs.
pub fn tick_label(v: f64, step: f64) -> String {
    let a = v.abs();
    let (scaled, suffix, step) = if a >= 1e9 {
        (v / 1e9, "G", step / 1e9)
    } else if a >= 1e6 {
        (v / 1e6, "M", step / 1e6)
    } else if a >= 1e4 {
        (v / 1e3, "k", step / 1e3)
    } else {
        (v, "", step)
    };
    // As many decimals as the step needs to be written exactly (at most 4).
    let decimals = (0..4)
        .find(|k| {
            let v = step * 10f64.powi(*k as i32);
            (v - v.round()).abs() < 1e-6 * v.abs().max(1.0)
        })
        .unwrap_or(4);
    let mut s = format!("{scaled:.decimals$}");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    if s == "-0" {
        s = "0".into();
    }
    format!("{s}{suffix}")
}

fn log_label(v: f64) -> String {
    if v >= 1.0 {
        tick_label(v, 1.0)
    } else {
        let decimals = (-v.log10().floor()) as usize;
        format!("{v:.decimals$}")
    }
}

/// Splits a line into runs where no step is much longer than usual (missing samples).
fn segments(points: &[(f64, f64)]) -> Vec<&[(f64, f64)]> {
    if points.len() < 3 {
        return vec![points];
    }
    let mut gaps: Vec<f64> = points.windows(2).map(|w| w[1].0 - w[0].0).collect();
    gaps.sort_by(f64::total_cmp);
    let typical = gaps[gaps.len() / 2].max(1e-9);
    let mut out = Vec::new();
    let mut start = 0;
    for i in 1..points.len() {
        if points[i].0 - points[i - 1].0 > typical * 2.5 {
            out.push(&points[start..i]);
            start = i;
        }
    }
    out.push(&points[start..]);
    out
}

fn empty_svg(chart: &Chart) -> String {
    format!(
        r##"<svg class="chart chart-empty" data-chart="{name}" viewBox="0 0 {WIDTH} 60" width="100%" role="img" aria-label="{title}: {note}"><title>{title}</title><rect x="0.5" y="0.5" width="{w}" height="59" fill="#fafafa" stroke="#ddd"/><text x="{cx}" y="35" text-anchor="middle" class="note">{note}</text></svg>"##,
        name = escape_xml(&chart.name),
        title = escape_xml(&chart.title),
        note = escape_xml(&chart.empty_note),
        w = WIDTH - 1.0,
        cx = WIDTH / 2.0,
    )
}

/// The legend's items laid out in rows: (row, x) of each item, and the number of rows.
fn legend_layout(labels: &[&str]) -> (Vec<(usize, f64)>, usize) {
    let mut out = Vec::new();
    let (mut row, mut x) = (0usize, LEFT);
    for l in labels {
        let w = 30.0 + CHAR_W * l.chars().count() as f64 + 18.0;
        if x + w > WIDTH - RIGHT && x > LEFT {
            row += 1;
            x = LEFT;
        }
        out.push((row, x));
        x += w;
    }
    let rows = if labels.is_empty() { 0 } else { row + 1 };
    (out, rows)
}

/// Renders `chart` as one `<svg>` element.
pub fn render(chart: &Chart) -> String {
    if !chart.has_data() {
        return empty_svg(chart);
    }
    let tx = |x: f64| match chart.x_kind {
        XKind::Time => x,
        XKind::Percentile => pct_x(x),
    };
    // Domains.
    let all = || chart.lines.iter().flat_map(|l| l.points.iter());
    let (x_lo, x_hi) = chart.x_range.unwrap_or_else(|| {
        let lo = all().map(|p| p.0).fold(f64::INFINITY, f64::min);
        let hi = all().map(|p| p.0).fold(f64::NEG_INFINITY, f64::max);
        match chart.x_kind {
            XKind::Time => (0.0, hi.max(lo + 1.0)),
            XKind::Percentile => (50.0, 99.99),
        }
    });
    let (x0, x1) = (tx(x_lo), tx(x_hi).max(tx(x_lo) + 1e-9));
    let y_max = all()
        .map(|p| p.1)
        .filter(|v| v.is_finite())
        .fold(0.0, f64::max);
    let (y0, y1, y_ticks, y_step) = match chart.y_scale {
        Scale::Linear => {
            let (a, b, t) = linear_ticks(0.0, if y_max > 0.0 { y_max * 1.04 } else { 1.0 }, 5.0);
            let step = if t.len() > 1 { t[1] - t[0] } else { 1.0 };
            (a, b, t, step)
        }
        Scale::Log => {
            let y_min = all()
                .map(|p| p.1)
                .filter(|v| *v > 0.0 && v.is_finite())
                .fold(f64::INFINITY, f64::min);
            let y_min = if y_min.is_finite() { y_min } else { 1.0 };
            let (a, b, t) = log_ticks(y_min, y_max.max(y_min * 1.0001));
            (a, b, t, 1.0)
        }
    };
    let plot_w = WIDTH - LEFT - RIGHT;
    let px = |x: f64| LEFT + (tx(x) - x0) / (x1 - x0) * plot_w;
    let py = |y: f64| {
        let f = match chart.y_scale {
            Scale::Linear => (y - y0) / (y1 - y0),
            Scale::Log => {
                if y <= 0.0 {
                    0.0
                } else {
                    (y.log10() - y0.log10()) / (y1.log10() - y0.log10())
                }
            }
        };
        TOP + PLOT_HEIGHT * (1.0 - f.clamp(-0.05, 1.05))
    };
    let labels: Vec<&str> = chart.lines.iter().map(|l| l.label.as_str()).collect();
    let (legend, rows) = legend_layout(&labels);
    let height = TOP + PLOT_HEIGHT + X_AXIS_SPACE + rows as f64 * LEGEND_ROW + 8.0;
    let bottom = TOP + PLOT_HEIGHT;
    let name = escape_xml(&chart.name);

    let mut o = String::new();
    let _ = write!(
        o,
        r#"<svg class="chart" data-chart="{name}" viewBox="0 0 {WIDTH} {height:.0}" width="100%" role="img" aria-label="{title}"><title>{title}</title>"#,
        title = escape_xml(&chart.title),
    );
    let _ = write!(
        o,
        r#"<defs><clipPath id="clip-{name}"><rect x="{LEFT}" y="{TOP}" width="{plot_w}" height="{PLOT_HEIGHT}"/></clipPath></defs>"#
    );
    // Bands (fault windows), behind everything.
    let mut label_rows: Vec<f64> = Vec::new(); // right end of the last label in each row
    for b in &chart.bands {
        let (a, z) = (px(b.from.max(x_lo)), px(b.to.min(x_hi)));
        if z < LEFT || a > WIDTH - RIGHT {
            continue;
        }
        let (a, z) = (a.max(LEFT), z.min(WIDTH - RIGHT));
        let _ = write!(
            o,
            r#"<g class="band"><rect x="{a:.1}" y="{TOP}" width="{:.1}" height="{PLOT_HEIGHT}" fill="{FAULT_FILL}" fill-opacity="0.13"/><line x1="{a:.1}" y1="{TOP}" x2="{a:.1}" y2="{bottom}" stroke="{FAULT_FILL}" stroke-opacity="0.6" stroke-dasharray="3 3"/><line x1="{z:.1}" y1="{TOP}" x2="{z:.1}" y2="{bottom}" stroke="{FAULT_FILL}" stroke-opacity="0.6" stroke-dasharray="3 3"/>"#,
            (z - a).max(1.0)
        );
        let text_w = CHAR_W * 0.95 * b.label.chars().count() as f64;
        let row = label_rows
            .iter()
            .position(|end| *end + 6.0 < a)
            .unwrap_or(label_rows.len());
        if row < 2 {
            if row == label_rows.len() {
                label_rows.push(a + text_w);
            } else {
                label_rows[row] = a + text_w;
            }
            let anchor_x = a.min(WIDTH - RIGHT - text_w).max(2.0);
            let _ = write!(
                o,
                r#"<text x="{anchor_x:.1}" y="{:.1}" class="band-label">{}</text>"#,
                TOP - 6.0 - row as f64 * 14.0,
                escape_xml(&b.label)
            );
        }
        let _ = write!(o, "<title>{}</title></g>", escape_xml(&b.label));
    }
    // Grid and y axis.
    for v in &y_ticks {
        let y = py(*v);
        if !(TOP - 0.5..=bottom + 0.5).contains(&y) {
            continue;
        }
        let label = match chart.y_scale {
            Scale::Linear => tick_label(*v, y_step),
            Scale::Log => log_label(*v),
        };
        let _ = write!(
            o,
            r#"<line x1="{LEFT}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" class="grid"/><text x="{:.1}" y="{:.1}" text-anchor="end" class="tick">{}</text>"#,
            WIDTH - RIGHT,
            LEFT - 6.0,
            y + 4.0,
            escape_xml(&label)
        );
    }
    // X ticks.
    let x_ticks: Vec<(f64, String)> = match chart.x_kind {
        XKind::Time => {
            let (_, _, t) = linear_ticks(x_lo, x_hi, 10.0);
            let step = if t.len() > 1 { t[1] - t[0] } else { 1.0 };
            t.into_iter()
                .filter(|v| *v >= x_lo - 1e-9 && *v <= x_hi + 1e-9)
                .map(|v| (v, tick_label(v, step)))
                .collect()
        }
        XKind::Percentile => [50.0, 90.0, 99.0, 99.9, 99.99]
            .into_iter()
            .map(|p| (p, format!("p{p}")))
            .collect(),
    };
    for (v, label) in &x_ticks {
        let x = px(*v);
        let _ = write!(
            o,
            r#"<line x1="{x:.1}" y1="{bottom}" x2="{x:.1}" y2="{:.1}" class="axis"/><line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{bottom}" class="grid grid-x"/><text x="{x:.1}" y="{:.1}" text-anchor="middle" class="tick">{}</text>"#,
            bottom + 5.0,
            bottom + 18.0,
            escape_xml(label)
        );
    }
    let _ = write!(
        o,
        r#"<line x1="{LEFT}" y1="{TOP}" x2="{LEFT}" y2="{bottom}" class="axis"/><line x1="{LEFT}" y1="{bottom}" x2="{:.1}" y2="{bottom}" class="axis"/>"#,
        WIDTH - RIGHT
    );
    let _ = write!(
        o,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle" class="axis-label">{}</text>"#,
        LEFT + plot_w / 2.0,
        bottom + 36.0,
        escape_xml(&chart.x_label)
    );
    let _ = write!(
        o,
        r#"<text transform="translate(16 {:.1}) rotate(-90)" text-anchor="middle" class="axis-label">{}</text>"#,
        TOP + PLOT_HEIGHT / 2.0,
        escape_xml(&chart.y_label)
    );
    // Markers (load start / end).
    for m in &chart.markers {
        if m.x < x_lo || m.x > x_hi {
            continue;
        }
        let x = px(m.x);
        // Labels near the right edge go on the left of their line.
        let near_end = x + 4.0 + CHAR_W * m.label.chars().count() as f64 > WIDTH - RIGHT;
        let (tx, anchor) = if near_end {
            (x - 3.0, "end")
        } else {
            (x + 3.0, "start")
        };
        let _ = write!(
            o,
            r#"<line x1="{x:.1}" y1="{TOP}" x2="{x:.1}" y2="{bottom}" class="marker"/><text x="{tx:.1}" y="{:.1}" text-anchor="{anchor}" class="marker-label">{}</text>"#,
            TOP + 11.0,
            escape_xml(&m.label)
        );
    }
    // Lines.
    let _ = write!(o, r#"<g clip-path="url(#clip-{name})">"#);
    for (i, l) in chart.lines.iter().enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let dash = if l.dashed {
            r#" stroke-dasharray="6 3""#
        } else {
            ""
        };
        let pts: Vec<(f64, f64)> = l
            .points
            .iter()
            .copied()
            .filter(|(x, y)| x.is_finite() && y.is_finite())
            .collect();
        let segs = match chart.x_kind {
            XKind::Time => segments(&pts),
            XKind::Percentile => vec![pts.as_slice()],
        };
        for seg in segs {
            match seg {
                [] => {}
                [(x, y)] => {
                    let _ = write!(
                        o,
                        r#"<circle cx="{:.1}" cy="{:.1}" r="2.2" fill="{color}"><title>{}</title></circle>"#,
                        px(*x),
                        py(*y),
                        escape_xml(&l.label)
                    );
                }
                _ => {
                    let coords: Vec<String> = seg
                        .iter()
                        .map(|(x, y)| format!("{:.1},{:.1}", px(*x), py(*y)))
                        .collect();
                    let _ = write!(
                        o,
                        r#"<polyline fill="none" stroke="{color}" stroke-width="1.7" stroke-linejoin="round"{dash} points="{}"><title>{}</title></polyline>"#,
                        coords.join(" "),
                        escape_xml(&l.label)
                    );
                }
            }
        }
    }
    o.push_str("</g>");
    // Legend.
    let legend_top = bottom + X_AXIS_SPACE + 6.0;
    for (i, (l, (row, x))) in chart.lines.iter().zip(&legend).enumerate() {
        let color = PALETTE[i % PALETTE.len()];
        let y = legend_top + *row as f64 * LEGEND_ROW;
        let dash = if l.dashed {
            r#" stroke-dasharray="6 3""#
        } else {
            ""
        };
        let _ = write!(
            o,
            r#"<g class="legend-item"><line x1="{x:.1}" y1="{y:.1}" x2="{:.1}" y2="{y:.1}" stroke="{color}" stroke-width="3"{dash}/><text x="{:.1}" y="{:.1}" class="legend">{}</text></g>"#,
            x + 24.0,
            x + 30.0,
            y + 4.0,
            escape_xml(&l.label)
        );
    }
    o.push_str("</svg>");
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nice_ticks() {
        let (lo, hi, t) = linear_ticks(0.0, 97.0, 5.0);
        assert_eq!((lo, hi), (0.0, 100.0));
        assert_eq!(t, vec![0.0, 20.0, 40.0, 60.0, 80.0, 100.0]);
        let (lo, hi, t) = log_ticks(0.7, 430.0);
        assert_eq!((lo, hi), (0.5, 500.0));
        assert!(t.contains(&1.0) && t.contains(&100.0) && t.contains(&500.0));
        let (lo, hi, t) = log_ticks(8.0, 90.0);
        assert_eq!(
            (lo, hi, t),
            (5.0, 100.0, vec![5.0, 10.0, 20.0, 50.0, 100.0])
        );
        assert_eq!(tick_label(1500.0, 500.0), "1500");
        assert_eq!(tick_label(25_000.0, 5000.0), "25k");
        assert_eq!(tick_label(0.25, 0.05), "0.25");
        assert_eq!(tick_label(2.5, 2.5), "2.5");
    }

    #[test]
    fn breaks_lines_at_gaps() {
        let pts = [(0.0, 1.0), (1.0, 1.0), (2.0, 1.0), (9.0, 1.0), (10.0, 1.0)];
        assert_eq!(segments(&pts).len(), 2);
    }

    #[test]
    fn empty_chart_says_so() {
        let mut c = Chart::new("lag", "Lag", XKind::Time, "messages");
        c.empty_note = "no consumer groups".into();
        let svg = render(&c);
        assert!(svg.contains(r#"data-chart="lag""#) && svg.contains("no consumer groups"));
        assert!(!svg.contains("<polyline"));
        c.lines.push(Line {
            label: "g".into(),
            points: vec![(0.0, 1.0), (1.0, 2.0)],
            dashed: false,
        });
        assert!(render(&c).contains("<polyline"));
    }
}
