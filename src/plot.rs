//! PNG charts drawn with plotters and an embedded font (no system font libraries).

use std::path::Path;
use std::sync::Once;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One named series of points, each with an optional label drawn beside it.
#[derive(Debug, Clone)]
pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
    pub labels: Vec<String>,
}

/// How to draw a chart.
#[derive(Debug, Clone, Copy)]
pub struct Style<'a> {
    pub title: &'a str,
    pub x_desc: &'a str,
    pub y_desc: &'a str,
    pub log_y: bool,
    /// Join each series' points with a line.
    pub lines: bool,
    /// Mark each point with a dot (off for long curves, where dots hide the lines).
    pub markers: bool,
    /// Names for integer x positions (a categorical axis).
    pub x_names: Option<&'a [String]>,
}

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        // The embedded DejaVu Sans is a valid font; a failure would only lose text.
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

fn bounds(v: impl Iterator<Item = f64> + Clone, log: bool) -> (f64, f64) {
    let v = v.filter(|x| x.is_finite() && (!log || *x > 0.0));
    let lo = v.clone().fold(f64::INFINITY, f64::min);
    let hi = v.fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() {
        return if log { (1e-9, 1.0) } else { (0.0, 1.0) };
    }
    if log {
        (lo / 2.0, hi * 2.0)
    } else {
        let pad = ((hi - lo) * 0.08).max(hi.abs() * 0.05).max(1e-9);
        (
            (lo - pad).min(if lo >= 0.0 { 0.0 } else { lo - pad }),
            hi + pad,
        )
    }
}

/// Draws `series` into a PNG at `path`.
pub fn chart(path: &Path, style: Style<'_>, series: &[Series]) -> Result<()> {
    register_font();
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());
    let root = BitMapBackend::new(path, (900, 600)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let all = || series.iter().flat_map(|s| s.points.iter());
    let (x0, x1) = bounds(all().map(|p| p.0), false);
    let (y0, y1) = bounds(all().map(|p| p.1), style.log_y);
    let mut b = ChartBuilder::on(&root);
    b.caption(style.title, ("sans-serif", 24))
        .margin(16)
        .x_label_area_size(48)
        .y_label_area_size(80);
    let colors = [&BLUE, &RED, &GREEN, &MAGENTA, &CYAN, &BLACK];
    macro_rules! draw {
        ($chart:expr) => {{
            let mut chart = $chart;
            let x_fmt = |x: &f64| match style.x_names {
                Some(names) if (x - x.round()).abs() < 1e-9 && *x >= 0.0 => {
                    names.get(x.round() as usize).cloned().unwrap_or_default()
                }
                Some(_) => String::new(),
                None => format!("{x}"),
            };
            let y_fmt = |y: &f64| {
                if style.log_y {
                    format!("{y:.0e}")
                } else {
                    format!("{y}")
                }
            };
            chart
                .configure_mesh()
                .x_desc(style.x_desc)
                .y_desc(style.y_desc)
                .x_label_formatter(&x_fmt)
                .y_label_formatter(&y_fmt)
                .label_style(("sans-serif", 15))
                .draw()
                .map_err(|e| err(&e))?;
            for (i, s) in series.iter().enumerate() {
                let color = colors[i % colors.len()];
                let pts: Vec<(f64, f64)> = s
                    .points
                    .iter()
                    .copied()
                    .filter(|p| p.1.is_finite() && (!style.log_y || p.1 > 0.0))
                    .collect();
                if style.lines {
                    let line = chart
                        .draw_series(LineSeries::new(pts.clone(), color.stroke_width(2)))
                        .map_err(|e| err(&e))?;
                    if !style.markers {
                        line.label(s.name.clone()).legend(move |(x, y)| {
                            PathElement::new([(x - 8, y), (x + 8, y)], color.stroke_width(3))
                        });
                    }
                }
                if style.markers || !style.lines {
                    chart
                        .draw_series(pts.iter().map(|p| Circle::new(*p, 4, color.filled())))
                        .map_err(|e| err(&e))?
                        .label(s.name.clone())
                        .legend(move |(x, y)| Circle::new((x, y), 5, color.filled()));
                }
                let labels = pts.iter().zip(&s.labels).map(|(p, l)| {
                    EmptyElement::at(*p)
                        + Text::new(
                            l.clone(),
                            (8, -6),
                            ("sans-serif", 14).into_font().color(color),
                        )
                });
                chart.draw_series(labels).map_err(|e| err(&e))?;
            }
            chart
                .configure_series_labels()
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .label_font(("sans-serif", 15))
                .draw()
                .map_err(|e| err(&e))?;
        }};
    }
    if style.log_y {
        draw!(b
            .build_cartesian_2d(x0..x1, (y0..y1).log_scale())
            .map_err(|e| err(&e))?);
    } else {
        draw!(b.build_cartesian_2d(x0..x1, y0..y1).map_err(|e| err(&e))?);
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}
