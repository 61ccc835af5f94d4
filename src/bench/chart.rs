//! The throughput-versus-concurrency chart as a small self-contained SVG.

use std::fmt::Write;

/// One plotted series.
pub(crate) struct Series<'a> {
    pub(crate) label: &'a str,
    pub(crate) colour: &'a str,
    pub(crate) dashed: bool,
    /// (concurrency, jobs per second)
    pub(crate) points: Vec<(f64, f64)>,
}

/// Draws the series on a log2 concurrency axis and a linear jobs/s axis.
pub(crate) fn svg(title: &str, series: &[Series<'_>]) -> String {
    let (width, height, left, right, top, bottom) = (720.0, 420.0, 70.0, 200.0, 40.0, 50.0);
    let plot_w = width - left - right;
    let plot_h = height - top - bottom;
    let xs: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0.log2()))
        .collect();
    let x_min = xs.iter().copied().fold(f64::INFINITY, f64::min);
    let x_max = xs
        .iter()
        .copied()
        .fold(f64::NEG_INFINITY, f64::max)
        .max(x_min + 1.0);
    let y_max = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .fold(1.0, f64::max)
        * 1.1;
    let x = |c: f64| left + (c.log2() - x_min) / (x_max - x_min) * plot_w;
    let y = |v: f64| top + plot_h - v / y_max * plot_h;
    let mut out = String::new();
    let _ = write!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="12"><rect width="100%" height="100%" fill="white"/><text x="{left}" y="22" font-size="15">{title}</text>"#
    );
    for tick in 0..=5 {
        let v = y_max / 5.0 * f64::from(tick);
        let _ = write!(
            out,
            r##"<line x1="{left}" x2="{}" y1="{y0:.1}" y2="{y0:.1}" stroke="#ddd"/><text x="{}" y="{:.1}" text-anchor="end">{v:.0}</text>"##,
            left + plot_w,
            left - 6.0,
            y(v) + 4.0,
            y0 = y(v)
        );
    }
    let mut concurrencies: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .collect();
    concurrencies.sort_by(f64::total_cmp);
    concurrencies.dedup();
    for c in &concurrencies {
        let _ = write!(
            out,
            r#"<text x="{:.1}" y="{}" text-anchor="middle">{c}</text>"#,
            x(*c),
            top + plot_h + 18.0
        );
    }
    let _ = write!(
        out,
        r#"<text x="{:.1}" y="{}" text-anchor="middle">concurrency (jobs in flight per worker)</text><text x="16" y="{:.1}" transform="rotate(-90 16 {:.1})" text-anchor="middle">jobs/s end to end</text>"#,
        left + plot_w / 2.0,
        height - 10.0,
        top + plot_h / 2.0,
        top + plot_h / 2.0
    );
    for (index, s) in series.iter().enumerate() {
        let path: Vec<String> = s
            .points
            .iter()
            .map(|(c, v)| format!("{:.1},{:.1}", x(*c), y(*v)))
            .collect();
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let _ = write!(
            out,
            r#"<polyline points="{}" fill="none" stroke="{}" stroke-width="2"{dash}/>"#,
            path.join(" "),
            s.colour
        );
        for (c, v) in &s.points {
            let _ = write!(
                out,
                r#"<circle cx="{:.1}" cy="{:.1}" r="3.5" fill="{}"/>"#,
                x(*c),
                y(*v),
                s.colour
            );
        }
        let ly = top + 14.0 + 20.0 * index as f64;
        let _ = write!(
            out,
            r#"<line x1="{:.1}" x2="{:.1}" y1="{ly:.1}" y2="{ly:.1}" stroke="{}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            left + plot_w + 12.0,
            left + plot_w + 36.0,
            s.colour,
            left + plot_w + 42.0,
            ly + 4.0,
            s.label
        );
    }
    out.push_str("</svg>\n");
    out
}
