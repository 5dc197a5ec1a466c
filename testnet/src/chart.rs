//! The report's line charts, drawn with plotters' SVG backend (png.rs rasterizes them).
//!
//! Owns: axes, ticks, colours and the legend. Must not touch: what is charted (report.rs
//! picks the series). Every charted quantity is a non-negative amount (loss, ROUGE-L, bytes,
//! seconds, joules, G), so the y axis starts at zero; the x axis counts rounds, so its ticks
//! are whole numbers; tick steps are 1, 2 or 5 times a power of ten; the legend is a list
//! under the plot, never on the curves.

use std::ops::Range;

use plotters::coord::ranged1d::{DefaultFormatting, KeyPointHint};
use plotters::coord::types::RangedCoordf64;
use plotters::prelude::*;

/// One labelled curve: (x, y) points in x order.
#[derive(Debug, Clone, PartialEq)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

impl Series {
    pub fn new(label: &str, points: Vec<(f64, f64)>) -> Self {
        Self {
            label: label.to_owned(),
            points,
        }
    }
}

/// Title and axis names of a chart.
#[derive(Debug, Clone, Copy)]
pub struct ChartText<'a> {
    pub title: &'a str,
    pub x: &'a str,
    pub y: &'a str,
}

#[derive(Debug, thiserror::Error)]
#[error("drawing the chart `{title}`: {reason}")]
pub struct ChartError {
    title: String,
    reason: String,
}

const WIDTH: u32 = 800;
pub const PLOT_HEIGHT: u32 = 440;
const LEGEND_ROW: u32 = 20;
/// Tableau 10: distinct for the colour-blind and in greyscale print.
const COLOURS: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// A linear f64 axis whose labelled ticks are exactly `ticks` (plotters picks its own
/// otherwise); labels come from the chart's formatters.
struct TickedAxis {
    linear: RangedCoordf64,
    ticks: Vec<f64>,
}

impl TickedAxis {
    /// From the first tick to the last.
    fn new(ticks: Vec<f64>) -> Self {
        let bottom = ticks.first().copied().unwrap_or(0.0);
        let top = ticks.last().copied().unwrap_or(1.0);
        Self {
            linear: (bottom..top).into(),
            ticks,
        }
    }
}

impl Ranged for TickedAxis {
    type FormatOption = DefaultFormatting;
    type ValueType = f64;

    fn map(&self, value: &f64, limit: (i32, i32)) -> i32 {
        self.linear.map(value, limit)
    }

    fn key_points<Hint: KeyPointHint>(&self, hint: Hint) -> Vec<f64> {
        // Grid lines at the labelled ticks only.
        if hint.weight().allow_light_points() {
            Vec::new()
        } else {
            self.ticks.clone()
        }
    }

    fn range(&self) -> Range<f64> {
        self.linear.range()
    }
}

/// A round tick step: 1, 2 or 5 times a power of ten, giving at most about `ticks` steps
/// over `span`.
pub fn nice_step(span: f64, ticks: usize) -> f64 {
    let raw = (span / ticks.max(1) as f64).max(f64::MIN_POSITIVE);
    let magnitude = 10f64.powf(raw.log10().floor());
    [1.0, 2.0, 5.0, 10.0]
        .into_iter()
        .map(|m| m * magnitude)
        .find(|step| *step >= raw * (1.0 - 1e-9))
        .unwrap_or(10.0 * magnitude)
}

/// Ticks 0, step, 2 step, ... up to the first at or above `max` (so the data fits under the
/// last tick), with the step; `integer` keeps the step at least 1.
pub fn ticks_from_zero(max: f64, ticks: usize, integer: bool) -> (Vec<f64>, f64) {
    let max = if max.is_finite() && max > 0.0 {
        max
    } else {
        1.0
    };
    let mut step = nice_step(max, ticks);
    if integer {
        step = step.max(1.0).round();
    }
    let count = (max / step - 1e-9).ceil().max(1.0) as usize;
    ((0..=count).map(|k| k as f64 * step).collect(), step)
}

/// Ticks from a multiple of the step at or below `min` to the first at or above `max`.
pub fn ticks_between(min: f64, max: f64, ticks: usize) -> (Vec<f64>, f64) {
    let span = (max - min).max(1e-9);
    let step = nice_step(span, ticks);
    let first = (min / step).floor() * step;
    let count = ((max - first) / step - 1e-9).ceil().max(1.0) as usize;
    ((0..=count).map(|k| first + k as f64 * step).collect(), step)
}

/// A tick label with just the decimals its step needs (0.05 -> "0.05", 2000 -> "2000").
pub fn tick_label(value: f64, step: f64) -> String {
    let decimals = (-step.log10().floor()).max(0.0) as usize;
    format!("{value:.decimals$}")
}

/// The SVG of a line chart of `series` against rounds.
pub fn line_chart_svg(text: ChartText<'_>, series: &[Series]) -> Result<String, ChartError> {
    let fail = |reason: String| ChartError {
        title: text.title.to_owned(),
        reason,
    };
    let points = || series.iter().flat_map(|s| s.points.iter());
    let x_max = points().map(|p| p.0).fold(1.0, f64::max);
    let y_max = points()
        .map(|p| p.1)
        .filter(|y| y.is_finite())
        .fold(0.0, f64::max);
    let (x_ticks, _) = ticks_from_zero(x_max, 10, true);
    let (y_ticks, y_step) = ticks_from_zero(y_max, 6, false);
    let height = PLOT_HEIGHT + 12 + LEGEND_ROW * series.len() as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let (plot, legend) = root.split_vertically(PLOT_HEIGHT);
        let mut chart = ChartBuilder::on(&plot)
            .caption(text.title, ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d(TickedAxis::new(x_ticks), TickedAxis::new(y_ticks))
            .map_err(|e| fail(e.to_string()))?;
        let x_format = |x: &f64| format!("{}", x.round() as i64);
        let y_format = |y: &f64| tick_label(*y, y_step);
        chart
            .configure_mesh()
            .x_desc(text.x)
            .y_desc(text.y)
            .x_label_formatter(&x_format)
            .y_label_formatter(&y_format)
            .bold_line_style(RGBColor(225, 225, 225))
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 14))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        for (i, s) in series.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            let finite: Vec<(f64, f64)> = s
                .points
                .iter()
                .copied()
                .filter(|(x, y)| x.is_finite() && y.is_finite())
                .collect();
            chart
                .draw_series(LineSeries::new(finite.clone(), colour.stroke_width(2)))
                .map_err(|e| fail(e.to_string()))?;
            if finite.len() <= 40 {
                chart
                    .draw_series(finite.iter().map(|p| Circle::new(*p, 3, colour.filled())))
                    .map_err(|e| fail(e.to_string()))?;
            }
        }
        let rows = series
            .iter()
            .enumerate()
            .map(|(i, s)| (COLOURS[i % COLOURS.len()], s.label.clone()));
        draw_legend(&legend, rows).map_err(fail)?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    Ok(svg)
}

/// The legend under a chart: one row per (colour, label), a short line then the text.
fn draw_legend(
    legend: &DrawingArea<SVGBackend<'_>, plotters::coord::Shift>,
    rows: impl IntoIterator<Item = (RGBColor, String)>,
) -> Result<(), String> {
    for (i, (colour, label)) in rows.into_iter().enumerate() {
        let y = 6 + (i as u32 * LEGEND_ROW) as i32;
        let line = PathElement::new(vec![(86, y + 8), (116, y + 8)], colour.stroke_width(3));
        legend.draw(&line).map_err(|e| e.to_string())?;
        let text = Text::new(label, (124, y), ("sans-serif", 14).into_font());
        legend.draw(&text).map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// One exchange on a frontier chart: its bytes per round (0 for a baseline that sends
/// nothing: drawn as a horizontal reference line) and its ROUGE-L with the spread over seeds.
#[derive(Debug, Clone, PartialEq)]
pub struct FrontierPoint {
    pub label: String,
    pub bytes: f64,
    pub rouge: f64,
    pub spread: f64,
}

/// The SVG of a frontier: ROUGE-L (± spread) against bytes on a log axis, one colour per
/// exchange; baselines that send no bytes are dashed horizontal lines, and `goal` (the f32
/// mesh minus one point) a grey dotted one. The y axis spans the data (not from zero: the
/// differences that matter are a point or two).
pub fn frontier_chart_svg(
    text: ChartText<'_>,
    points: &[FrontierPoint],
    goal: Option<f64>,
    budget: Option<f64>,
) -> Result<String, ChartError> {
    let fail = |reason: String| ChartError {
        title: text.title.to_owned(),
        reason,
    };
    let sent: Vec<&FrontierPoint> = points
        .iter()
        .filter(|p| p.bytes > 0.0 && p.rouge.is_finite())
        .collect();
    let xs = || {
        sent.iter()
            .map(|p| p.bytes)
            .chain(budget.filter(|b| *b > 0.0))
    };
    let x_min = xs().fold(f64::INFINITY, f64::min);
    let x_max = xs().fold(0.0, f64::max);
    let (x_lo, x_hi) = if x_max > 0.0 {
        (
            10f64.powf(x_min.log10().floor()),
            10f64.powf(x_max.log10().ceil().max(x_min.log10().floor() + 1.0)),
        )
    } else {
        (1.0, 10.0)
    };
    let ys = || {
        points
            .iter()
            .flat_map(|p| [p.rouge + p.spread, p.rouge - p.spread])
            .chain(goal)
            .filter(|y| y.is_finite())
    };
    let y_max = ys().fold(0.0, f64::max);
    let y_min = ys().fold(y_max, f64::min);
    let (y_ticks, y_step) = ticks_between(y_min, y_max, 6);
    let (y_bottom, y_top) = (y_ticks[0], y_ticks.last().copied().unwrap_or(1.0));
    let extra = usize::from(goal.is_some()) + usize::from(budget.is_some());
    let height = PLOT_HEIGHT + 12 + LEGEND_ROW * (points.len() + extra) as u32;
    let mut svg = String::new();
    {
        let root = SVGBackend::with_string(&mut svg, (WIDTH, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| fail(e.to_string()))?;
        let (plot, legend) = root.split_vertically(PLOT_HEIGHT);
        let mut chart = ChartBuilder::on(&plot)
            .caption(text.title, ("sans-serif", 18))
            .margin(14)
            .x_label_area_size(44)
            .y_label_area_size(72)
            .build_cartesian_2d((x_lo..x_hi).log_scale(), TickedAxis::new(y_ticks))
            .map_err(|e| fail(e.to_string()))?;
        let x_format = |x: &f64| human_count(*x);
        let y_format = |y: &f64| tick_label(*y, y_step);
        chart
            .configure_mesh()
            .x_desc(text.x)
            .y_desc(text.y)
            .x_label_formatter(&x_format)
            .y_label_formatter(&y_format)
            .bold_line_style(RGBColor(225, 225, 225))
            .label_style(("sans-serif", 13))
            .axis_desc_style(("sans-serif", 14))
            .draw()
            .map_err(|e| fail(e.to_string()))?;
        for (i, p) in points.iter().enumerate() {
            let colour = COLOURS[i % COLOURS.len()];
            if !p.rouge.is_finite() {
                continue;
            }
            if p.bytes > 0.0 {
                let (lo, hi) = (p.rouge - p.spread, p.rouge + p.spread);
                if p.spread > 0.0 {
                    chart
                        .draw_series([PathElement::new(
                            vec![(p.bytes, lo), (p.bytes, hi)],
                            colour.stroke_width(2),
                        )])
                        .map_err(|e| fail(e.to_string()))?;
                }
                chart
                    .draw_series([Circle::new((p.bytes, p.rouge), 5, colour.filled())])
                    .map_err(|e| fail(e.to_string()))?;
            } else {
                chart
                    .draw_series(DashedLineSeries::new(
                        vec![(x_lo, p.rouge), (x_hi, p.rouge)],
                        8,
                        5,
                        colour.stroke_width(2),
                    ))
                    .map_err(|e| fail(e.to_string()))?;
            }
        }
        let grey = RGBColor(110, 110, 110);
        if let Some(goal) = goal {
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(x_lo, goal), (x_hi, goal)],
                    2,
                    4,
                    grey.stroke_width(2),
                ))
                .map_err(|e| fail(e.to_string()))?;
        }
        let mut rows: Vec<(RGBColor, String)> = Vec::new();
        for (i, p) in points.iter().enumerate() {
            let label = if p.bytes > 0.0 {
                format!(
                    "{}: {} B, {:.1} ± {:.1}",
                    p.label,
                    human_count(p.bytes),
                    p.rouge,
                    p.spread
                )
            } else {
                format!(
                    "{} (no exchange): {:.1} ± {:.1}",
                    p.label, p.rouge, p.spread
                )
            };
            rows.push((COLOURS[i % COLOURS.len()], label));
        }
        if let Some(goal) = goal {
            rows.push((grey, format!("goal: f32 mesh - 1 point ({goal:.1})")));
        }
        if let Some(budget) = budget.filter(|b| *b > 0.0) {
            let black = RGBColor(30, 30, 30);
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(budget, y_bottom), (budget, y_top)],
                    2,
                    4,
                    black.stroke_width(2),
                ))
                .map_err(|e| fail(e.to_string()))?;
            rows.push((
                black,
                format!(
                    "goal: 50x fewer bytes than f32 ({} B; left of it)",
                    human_count(budget)
                ),
            ));
        }
        draw_legend(&legend, rows).map_err(fail)?;
        root.present().map_err(|e| fail(e.to_string()))?;
    }
    Ok(svg)
}

/// 1500 -> "1.5k", 4_100_000 -> "4.1M", 40 -> "40".
pub fn human_count(value: f64) -> String {
    let (scaled, unit) = if value >= 1e9 {
        (value / 1e9, "G")
    } else if value >= 1e6 {
        (value / 1e6, "M")
    } else if value >= 1e3 {
        (value / 1e3, "k")
    } else {
        (value, "")
    };
    let text = format!("{scaled:.1}");
    format!("{}{unit}", text.trim_end_matches(".0"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tick_steps_are_round_numbers() {
        assert_eq!(nice_step(1.0, 5), 0.2);
        assert_eq!(nice_step(0.46, 6), 0.1);
        assert_eq!(nice_step(20.0, 10), 2.0);
        assert_eq!(nice_step(230_000.0, 6), 50_000.0);
        let (ticks, step) = ticks_from_zero(0.476, 6, false);
        assert_eq!(step, 0.1);
        assert_eq!(ticks.len(), 6, "{ticks:?}"); // 0 .. 0.5
        assert_eq!(tick_label(ticks[3], step), "0.3");
        // Rounds: whole numbers even for a 2-round run.
        let (ticks, step) = ticks_from_zero(2.0, 10, true);
        assert_eq!((ticks, step), (vec![0.0, 1.0, 2.0], 1.0));
        let (ticks, _) = ticks_from_zero(20.0, 10, true);
        assert_eq!(ticks.last(), Some(&20.0));
        // No data: an axis from 0 to 1 rather than a degenerate one.
        assert_eq!(ticks_from_zero(0.0, 5, false).0.last(), Some(&1.0));
        assert_eq!(tick_label(50_000.0, 50_000.0), "50000");
        assert_eq!(tick_label(0.05, 0.05), "0.05");
    }

    #[test]
    fn a_frontier_chart_has_every_exchange_and_baseline_in_its_legend() {
        assert_eq!(human_count(4_111_872.0), "4.1M");
        assert_eq!(human_count(41_000.0), "41k");
        assert_eq!(human_count(100_000.0), "100k");
        assert_eq!(human_count(40.0), "40");
        let point = |label: &str, bytes: f64, rouge: f64| FrontierPoint {
            label: label.into(),
            bytes,
            rouge,
            spread: 0.7,
        };
        let svg = frontier_chart_svg(
            ChartText {
                title: "long",
                x: "bytes",
                y: "ROUGE-L",
            },
            &[
                point("f32", 4_111_872.0, 75.7),
                point("top2%", 41_000.0, 60.0),
                point("alone", 0.0, 64.7),
            ],
            Some(74.7),
            Some(4_111_872.0 / 50.0),
        )
        .expect("chart");
        for text in [
            "f32: 4.1M B, 75.7 ± 0.7",
            "top2%: 41k B",
            "alone (no exchange): 64.7",
            "goal: f32 mesh - 1 point (74.7)",
            "goal: 50x fewer bytes than f32 (82.2k B; left of it)",
        ] {
            assert!(svg.contains(text), "{text}");
        }
        // The log axis spans whole decades around the data.
        assert!(
            svg.contains("\n10k\n") && svg.contains("\n10M\n"),
            "decade ticks"
        );
        // The y axis spans the data: 60.0 - 0.7 .. 75.7 + 0.7 in steps of 5.
        assert_eq!(
            ticks_between(59.3, 76.4, 6),
            (vec![55.0, 60.0, 65.0, 70.0, 75.0, 80.0], 5.0)
        );
    }
}
