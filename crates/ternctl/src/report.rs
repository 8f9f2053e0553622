//! `domjobinfo --completed --report FILE.svg`: a migration drawn over time with `plotters`
//! (SVG backend): data remaining and bandwidth, the dirty passes, the switchover and the
//! downtime marked.

use std::path::Path;

use anyhow::{anyhow, bail, Result};
use plotters::prelude::*;
use virt::JobInfo;

const MIB: f64 = 1048576.0;

/// Writes the report of a completed job.
pub fn write_svg(domain: &str, j: &JobInfo, path: &Path) -> Result<()> {
    if path.extension().and_then(|e| e.to_str()) != Some("svg") {
        bail!("--report: only .svg is supported ({})", path.display());
    }
    if j.samples.is_empty() {
        bail!("--report: the last job has no samples (only a completed outgoing migration has)");
    }
    let total = j
        .time_elapsed_ms
        .unwrap_or(0)
        .max(j.samples.iter().map(|s| s.t_ms).max().unwrap_or(0))
        .max(1);
    let downtime = j.downtime_ms.unwrap_or(0);
    let switch_at = total.saturating_sub(downtime);
    let max_rem = j.samples.iter().map(|s| s.remaining).max().unwrap_or(0) as f64 / MIB;
    let max_bw = j
        .samples
        .iter()
        .map(|s| s.bandwidth.max(s.dirty_rate * 4096))
        .max()
        .unwrap_or(0) as f64
        / MIB;
    let err = |e: &dyn std::fmt::Display| anyhow!("drawing {}: {e}", path.display());

    let root = SVGBackend::new(path, (1000, 700)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let title = format!(
        "{domain}: {}, {} ({} ms total, {} ms downtime, {} passes)",
        j.operation.as_deref().unwrap_or("migration"),
        j.job_type.as_str(),
        total,
        downtime,
        j.memory_iteration.unwrap_or(0)
    );
    let root = root
        .titled(&title, ("sans-serif", 20))
        .map_err(|e| err(&e))?;
    let (top, bottom) = root.split_vertically(340);

    let passes: Vec<u64> = j
        .samples
        .windows(2)
        .filter(|w| w[1].pass > w[0].pass)
        .map(|w| w[1].t_ms)
        .collect();

    let mut c = ChartBuilder::on(&top)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0u64..total, 0f64..(max_rem * 1.1).max(1.0))
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("ms since the job started")
        .y_desc("data remaining (MiB)")
        .draw()
        .map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(
        j.samples.iter().map(|s| (s.t_ms, s.remaining as f64 / MIB)),
        &BLUE,
    ))
    .map_err(|e| err(&e))?
    .label("remaining")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    mark(&mut c, &passes, switch_at, total, max_rem * 1.1).map_err(|e| err(&e))?;
    c.configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;

    let mut c = ChartBuilder::on(&bottom)
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d(0u64..total, 0f64..(max_bw * 1.1).max(1.0))
        .map_err(|e| err(&e))?;
    c.configure_mesh()
        .x_desc("ms since the job started (grey: a new dirty pass; red: switchover, the band is the downtime)")
        .y_desc("MiB/s")
        .draw()
        .map_err(|e| err(&e))?;
    c.draw_series(LineSeries::new(
        j.samples.iter().map(|s| (s.t_ms, s.bandwidth as f64 / MIB)),
        &GREEN,
    ))
    .map_err(|e| err(&e))?
    .label("bandwidth")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
    c.draw_series(LineSeries::new(
        j.samples
            .iter()
            .map(|s| (s.t_ms, (s.dirty_rate * 4096) as f64 / MIB)),
        &MAGENTA,
    ))
    .map_err(|e| err(&e))?
    .label("dirty rate")
    .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], MAGENTA));
    mark(&mut c, &passes, switch_at, total, max_bw * 1.1).map_err(|e| err(&e))?;
    c.configure_series_labels()
        .border_style(BLACK)
        .draw()
        .map_err(|e| err(&e))?;
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

type Chart<'a> = ChartContext<
    'a,
    SVGBackend<'a>,
    Cartesian2d<plotters::coord::types::RangedCoordu64, plotters::coord::types::RangedCoordf64>,
>;

/// Pass boundaries (grey), the switchover (red line) and the downtime (red band).
fn mark(
    c: &mut Chart<'_>,
    passes: &[u64],
    switch_at: u64,
    total: u64,
    top: f64,
) -> Result<(), DrawingAreaErrorKind<std::io::Error>> {
    let top = top.max(1.0);
    c.draw_series(passes.iter().map(|t| {
        PathElement::new(
            vec![(*t, 0.0), (*t, top)],
            ShapeStyle::from(&BLACK.mix(0.25)),
        )
    }))?;
    c.draw_series(std::iter::once(Rectangle::new(
        [(switch_at, 0.0), (total, top)],
        RED.mix(0.2).filled(),
    )))?;
    c.draw_series(std::iter::once(PathElement::new(
        vec![(switch_at, 0.0), (switch_at, top)],
        ShapeStyle::from(&RED).stroke_width(2),
    )))?;
    Ok(())
}
