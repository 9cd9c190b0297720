//! `kvpool replay --plot`: hit ratio against capacity, one line per policy,
//! on a log axis (the shape of Figure 9 of the Mooncake FAST'25 paper).

use std::path::Path;
use std::sync::Once;

use kvpool::Error;
use plotters::coord::combinators::WithKeyPoints;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;

use super::sweep::Table;

/// DejaVu Sans cut down to ASCII and a few symbols (13 KiB; license beside
/// it): text is drawn without fontconfig or any system font.
const FONT: &[u8] = include_bytes!("DejaVuSans-subset.ttf");
const FAMILY: &str = "sans-serif";
const SIZE: (u32, u32) = (1000, 620);

enum Format {
    Svg,
    Png,
}

fn format_of(path: &Path) -> Option<Format> {
    let ext = path.extension()?.to_str()?.to_ascii_lowercase();
    match ext.as_str() {
        "svg" => Some(Format::Svg),
        "png" => Some(Format::Png),
        _ => None,
    }
}

/// Fails early (before any replay) on a file name that is neither .svg nor .png.
pub(crate) fn check_path(path: &Path) -> kvpool::Result<()> {
    format_of(path).map(|_| ()).ok_or_else(|| {
        Error::invalid_argument(format!(
            "--plot {}: the file name must end in .svg or .png",
            path.display()
        ))
    })
}

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        for style in [FontStyle::Normal, FontStyle::Bold] {
            plotters::style::register_font(FAMILY, style, FONT)
                .unwrap_or_else(|_| panic!("the bundled font is a valid TTF"));
        }
    });
}

/// Draws the sweep into `path` (SVG or PNG by extension).
pub(crate) fn draw(path: &Path, trace_name: &str, table: &Table) -> kvpool::Result<()> {
    register_font();
    let fail =
        |e: String| Error::invalid_argument(format!("cannot draw --plot {}: {e}", path.display()));
    match format_of(path) {
        Some(Format::Svg) => {
            let root = SVGBackend::new(path, SIZE).into_drawing_area();
            chart(&root, trace_name, table).map_err(fail)?;
            root.present().map_err(|e| fail(e.to_string()))
        }
        Some(Format::Png) => {
            let root = BitMapBackend::new(path, SIZE).into_drawing_area();
            chart(&root, trace_name, table).map_err(fail)?;
            root.present().map_err(|e| fail(e.to_string()))
        }
        None => check_path(path),
    }
}

/// `3000000` → `3M`, `100000` → `100k`.
fn short(tokens: f64) -> String {
    let (value, unit) = if tokens >= 1e9 {
        (tokens / 1e9, "G")
    } else if tokens >= 1e6 {
        (tokens / 1e6, "M")
    } else if tokens >= 1e3 {
        (tokens / 1e3, "k")
    } else {
        (tokens, "")
    };
    let digits = if value.fract().abs() < 1e-9 { 0 } else { 1 };
    format!("{value:.digits$}{unit}")
}

fn color(policy: &str, i: usize) -> RGBColor {
    match policy {
        "lru" => RGBColor(31, 119, 180),
        "chain" => RGBColor(214, 39, 40),
        _ => {
            let c = Palette99::pick(i + 2).to_rgba();
            RGBColor(c.0, c.1, c.2)
        }
    }
}

fn chart<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    trace_name: &str,
    table: &Table,
) -> Result<(), String> {
    let err = |e: DrawingAreaErrorKind<DB::ErrorType>| e.to_string();
    root.fill(&WHITE).map_err(err)?;
    let tokens: Vec<f64> = table
        .capacities()
        .iter()
        .filter_map(|&(t, _)| t.map(|t| t as f64))
        .collect();
    let (lo, hi) = match (tokens.first(), tokens.last()) {
        (Some(&lo), Some(&hi)) => (lo / 1.5, hi * 1.5),
        _ => return Err("a plot needs at least one bounded capacity".into()),
    };
    let max = table.max_token_hit_ratio;
    let top = ((max * 1.15).max(0.05) * 20.0).ceil() / 20.0;
    let mut chart = ChartBuilder::on(root)
        .caption(
            format!("Token hit ratio vs pool capacity \u{2013} {trace_name}"),
            (FAMILY, 24),
        )
        .margin(20)
        .x_label_area_size(55)
        .y_label_area_size(70)
        .build_cartesian_2d(
            (lo..hi).log_scale().with_key_points(tokens.clone()),
            0.0..top,
        )
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc(format!(
            "pool capacity (tokens, log scale; {}-token blocks)",
            table.block_tokens
        ))
        .y_desc("token hit ratio")
        .x_label_formatter(&|x| short(*x))
        .y_label_formatter(&|y| format!("{:.0}%", y * 100.0))
        .axis_desc_style((FAMILY, 18))
        .label_style((FAMILY, 15))
        .light_line_style(WHITE.mix(0.0))
        .bold_line_style(BLACK.mix(0.12))
        .draw()
        .map_err(err)?;

    let maximum = RGBColor(90, 90, 90);
    chart
        .draw_series(DashedLineSeries::new(
            [(lo, max), (hi, max)],
            8,
            6,
            maximum.stroke_width(2),
        ))
        .map_err(err)?
        .label(format!("unbounded pool (maximum) {:.1}%", max * 100.0))
        .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], maximum.stroke_width(2)));

    for (i, policy) in table.policies.iter().enumerate() {
        let c = color(policy, i);
        let points: Vec<(f64, f64)> = table
            .points
            .iter()
            .filter(|p| &p.policy == policy)
            .filter_map(|p| Some((p.capacity_tokens? as f64, p.token_hit_ratio)))
            .collect();
        chart
            .draw_series(LineSeries::new(points.clone(), c.stroke_width(3)))
            .map_err(err)?
            .label(policy.as_str())
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 24, y)], c.stroke_width(3)));
        chart
            .draw_series(
                points
                    .iter()
                    .map(|&(x, y)| Circle::new((x, y), 5, c.filled())),
            )
            .map_err(err)?;
        // A value goes above its point where this policy leads (first
        // listed wins a tie), below elsewhere, so labels of two policies at
        // one capacity never overlap.
        let leads: Vec<bool> = points
            .iter()
            .map(|&(x, y)| {
                table.points.iter().all(|p| {
                    let rank = table.policies.iter().position(|q| q == &p.policy);
                    p.capacity_tokens.map(|t| t as f64) != Some(x)
                        || p.token_hit_ratio < y
                        || (p.token_hit_ratio == y && rank >= Some(i))
                })
            })
            .collect();
        label_points(&mut chart, &points, &leads, c)?;
    }

    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .label_font((FAMILY, 16))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.4))
        .draw()
        .map_err(err)?;
    Ok(())
}

/// Writes each point's value next to it: above where `above` says so,
/// below otherwise.
fn label_points<DB: DrawingBackend>(
    chart: &mut ChartContext<'_, DB, Cartesian2d<WithKeyPoints<LogCoord<f64>>, RangedCoordf64>>,
    points: &[(f64, f64)],
    above: &[bool],
    color: RGBColor,
) -> Result<(), String> {
    chart
        .draw_series(points.iter().zip(above).map(|(&(x, y), &above)| {
            EmptyElement::at((x, y))
                + Text::new(
                    format!("{:.1}%", y * 100.0),
                    (-14, if above { -24 } else { 10 }),
                    (FAMILY, 13).into_font().color(&color),
                )
        }))
        .map_err(|e| e.to_string())?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capacities_are_labelled_briefly() {
        assert_eq!(short(1e5), "100k");
        assert_eq!(short(3e6), "3M");
        assert_eq!(short(5e7), "50M");
        assert_eq!(short(1.5e6), "1.5M");
        assert_eq!(short(512.0), "512");
    }

    #[test]
    fn only_svg_and_png_are_accepted() {
        assert!(check_path(Path::new("a.svg")).is_ok());
        assert!(check_path(Path::new("a.PNG")).is_ok());
        let err = check_path(Path::new("a.pdf")).unwrap_err().to_string();
        assert!(err.contains(".svg or .png"), "{err}");
        assert!(check_path(Path::new("noext")).is_err());
    }
}
