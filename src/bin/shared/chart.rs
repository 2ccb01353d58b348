//! Plot pieces shared by the benchmark's charts (`convoy-bench`'s own plot and the
//! comparison with mlx-lm): a series drawn as a line with point markers and a legend entry,
//! and the legend box.
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

pub type Chart<'a, 'b> =
    ChartContext<'a, BitMapBackend<'b>, Cartesian2d<RangedCoordf64, RangedCoordf64>>;

/// Draws `pts` as a 2-px line with filled circles, listed in the legend as `label`.
pub fn series<'a, 'b>(
    chart: &mut Chart<'a, 'b>,
    pts: &[(f64, f64)],
    color: RGBColor,
    label: impl Into<String>,
) -> Result<(), String> {
    chart
        .draw_series(LineSeries::new(pts.to_vec(), color.stroke_width(2)))
        .map_err(|e| e.to_string())?
        .label(label)
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2)));
    chart
        .draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// The legend box at `position`.
pub fn legend<'a, 'b: 'a>(
    chart: &mut Chart<'a, 'b>,
    font_size: u32,
    position: SeriesLabelPosition,
) -> Result<(), String> {
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .label_font(("sans-serif", font_size))
        .position(position)
        .draw()
        .map_err(|e| e.to_string())
}
