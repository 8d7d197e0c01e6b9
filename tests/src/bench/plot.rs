//! The picture of one failover as the client saw it: answers per millisecond from each
//! backend around the fault, drawn with plotters (SVG).

use std::path::Path;

use anyhow::{anyhow, Result};
use plotters::prelude::*;

/// One answer the client received: who sent it, and when, in ms relative to the fault.
pub struct Point<'a> {
    /// The backend that answered.
    pub by: &'a str,
    /// Milliseconds after the fault (negative: before).
    pub at_ms: f64,
}

/// Draws, to `path`, the answers per millisecond from each backend over `window` (ms
/// relative to the fault), in about 200 buckets.
pub fn client_view(path: &Path, title: &str, points: &[Point], window: (f64, f64)) -> Result<()> {
    let (from, to) = window;
    let buckets = 200usize;
    let width = (to - from) / buckets as f64;
    let mut names: Vec<&str> = points.iter().map(|p| p.by).collect();
    names.sort_unstable();
    names.dedup();
    let mut series: Vec<(&str, Vec<(f64, f64)>)> = Vec::new();
    let mut top = 1.0f64;
    for name in &names {
        let mut counts = vec![0u32; buckets];
        for p in points.iter().filter(|p| p.by == *name) {
            let i = ((p.at_ms - from) / width).floor();
            if i >= 0.0 && (i as usize) < buckets {
                counts[i as usize] += 1;
            }
        }
        let line: Vec<(f64, f64)> = counts
            .iter()
            .enumerate()
            .map(|(i, c)| (from + (i as f64 + 0.5) * width, *c as f64 / width))
            .collect();
        top = line.iter().map(|(_, y)| *y).fold(top, f64::max);
        series.push((name, line));
    }
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| anyhow!("plot: {e}"))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(60)
        .build_cartesian_2d(from..to, 0.0..top * 1.15)
        .map_err(|e| anyhow!("plot: {e}"))?;
    chart
        .configure_mesh()
        .x_desc("ms after the fault command started")
        .y_desc("answers per ms")
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    let colors = [RED, BLUE, GREEN, MAGENTA];
    for (i, (name, line)) in series.into_iter().enumerate() {
        let color = colors[i % colors.len()];
        chart
            .draw_series(LineSeries::new(line, color.stroke_width(2)))
            .map_err(|e| anyhow!("plot: {e}"))?
            .label(name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
    }
    chart
        .draw_series(LineSeries::new(
            vec![(0.0, 0.0), (0.0, top * 1.15)],
            BLACK.stroke_width(1),
        ))
        .map_err(|e| anyhow!("plot: {e}"))?
        .label("fault")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.8))
        .draw()
        .map_err(|e| anyhow!("plot: {e}"))?;
    root.present().map_err(|e| anyhow!("plot: {e}"))?;
    Ok(())
}
