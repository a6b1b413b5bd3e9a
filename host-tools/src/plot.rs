//! A picture of a hand-off: clients' request latency over time, with each
//! move of a capsule shaded from the freeze to running again. Drawn as SVG
//! with plotters (no system font library: plotters estimates text sizes, the
//! viewer renders the text). Used by `capsulectl demo --plot` and the
//! migration benchmark's `--plot`.
//!
//! The input is plain data ([`Figure`]), so the drawing is tested without a
//! lab. Every move band is a `<rect class="move">` with a `<title>` (its
//! label), so scripts and tests can count them.

use std::path::Path;

use anyhow::{Context, Result, anyhow};
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};

/// The `class` of each move band in the SVG.
pub const MOVE_CLASS: &str = "move";

/// One client's requests: (seconds since the shared start, latency in ms)
/// for each reply, in time order.
#[derive(Debug, Clone, Default)]
pub struct Series {
    pub label: String,
    pub points: Vec<(f64, f64)>,
}

/// A move: the capsule stood still from `from_s` to `to_s` (seconds on the
/// series' clock).
#[derive(Debug, Clone)]
pub struct Band {
    /// Written beside the band, e.g. "demo-kv vm2→vm1".
    pub label: String,
    pub from_s: f64,
    pub to_s: f64,
    /// The series whose capsule moved: the label takes its colour.
    pub series: Option<usize>,
}

#[derive(Debug, Clone, Default)]
pub struct Figure {
    pub title: String,
    /// A second line under the title (lab, accelerator, …); may be empty.
    pub subtitle: String,
    pub series: Vec<Series>,
    pub bands: Vec<Band>,
}

const SIZE: (u32, u32) = (1100, 600);
/// Height of the legend row under the chart.
const LEGEND_H: i32 = 36;
const X_LABEL_AREA: u32 = 52;
const LABEL_SIZE: f64 = 12.0;
const LEGEND_SIZE: f64 = 14.0;
/// Series colours (blue, orange, green, purple); labels of bands in the
/// colour of their series.
const COLOURS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xe6, 0x6a, 0x00),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];
const BAND_COLOUR: RGBColor = RGBColor(0xd0, 0x30, 0x30);
/// The opacity of move bands; nothing else in the figure is drawn with it
/// (that is how [`tag_bands`] finds them).
const BAND_ALPHA: f64 = 0.27;
/// Narrower bands are widened to this many pixels around their middle, so a
/// 20 ms freeze on a 20 s axis stays visible.
const MIN_BAND_PX: f64 = 5.0;
/// At most this many points per series per pixel column (min and max kept).
const POINTS_PER_COLUMN: usize = 2;

fn colour(i: usize) -> RGBColor {
    COLOURS[i % COLOURS.len()]
}

/// The SVG document of `fig`.
pub fn svg(fig: &Figure) -> Result<String> {
    let mut doc = String::new();
    {
        let root = SVGBackend::with_string(&mut doc, SIZE).into_drawing_area();
        draw(&root, fig).map_err(|e| anyhow!("cannot draw the plot: {e}"))?;
        root.present()
            .map_err(|e| anyhow!("cannot finish the plot: {e}"))?;
    }
    Ok(tag_bands(&doc, &fig.bands))
}

/// Draws `fig` into the SVG file `path`.
pub fn write_svg(fig: &Figure, path: &Path) -> Result<()> {
    let doc = svg(fig)?;
    std::fs::write(path, doc).with_context(|| format!("cannot write {}", path.display()))
}

/// Powers of ten around `lo..hi` (both > 0).
fn decades(lo: f64, hi: f64) -> (f64, f64) {
    let lo = 10f64.powf(lo.log10().floor());
    let mut hi = 10f64.powf(hi.log10().ceil());
    if hi <= lo {
        hi = lo * 10.0;
    }
    (lo, hi)
}

/// Keeps the lowest and the highest point of each of `columns` slices of
/// `x_range` (in time order), so a long series draws as it looks without
/// thousands of points per pixel.
fn thin(points: &[(f64, f64)], x_range: (f64, f64), columns: usize) -> Vec<(f64, f64)> {
    if points.len() <= columns * POINTS_PER_COLUMN {
        return points.to_vec();
    }
    let width = (x_range.1 - x_range.0).max(f64::MIN_POSITIVE);
    let column = |x: f64| (((x - x_range.0) / width * columns as f64) as usize).min(columns);
    let mut out = Vec::with_capacity(columns * POINTS_PER_COLUMN);
    let mut i = 0;
    while i < points.len() {
        let c = column(points[i].0);
        let mut j = i;
        let (mut lo, mut hi) = (i, i);
        while j < points.len() && column(points[j].0) == c {
            if points[j].1 < points[lo].1 {
                lo = j;
            }
            if points[j].1 > points[hi].1 {
                hi = j;
            }
            j += 1;
        }
        out.push(points[lo.min(hi)]);
        if lo != hi {
            out.push(points[lo.max(hi)]);
        }
        i = j;
    }
    out
}

/// Pixels of a text of `chars` characters at font `size` (plotters' own
/// estimate without a font library is close to this).
fn text_px(chars: usize, size: f64) -> f64 {
    chars as f64 * size / 1.24 * 0.55
}

fn draw<DB: DrawingBackend>(
    root: &DrawingArea<DB, Shift>,
    fig: &Figure,
) -> Result<(), DrawingAreaErrorKind<DB::ErrorType>> {
    root.fill(&WHITE)?;
    let sans = |size: f64| ("sans-serif", size).into_font();
    let title_h = if fig.subtitle.is_empty() { 40 } else { 62 };
    let (top, rest) = root.split_vertically(title_h);
    let (body, legend) = rest.split_vertically(SIZE.1 as i32 - title_h - LEGEND_H);
    top.draw(&Text::new(
        fig.title.clone(),
        (SIZE.0 as i32 / 2, 12),
        sans(22.0)
            .style(FontStyle::Bold)
            .color(&BLACK)
            .pos(Pos::new(HPos::Center, VPos::Top)),
    ))?;
    if !fig.subtitle.is_empty() {
        top.draw(&Text::new(
            fig.subtitle.clone(),
            (SIZE.0 as i32 / 2, 38),
            sans(15.0)
                .color(&RGBColor(0x44, 0x44, 0x44))
                .pos(Pos::new(HPos::Center, VPos::Top)),
        ))?;
    }

    let all = || fig.series.iter().flat_map(|s| s.points.iter());
    let x_end = all()
        .map(|p| p.0)
        .chain(fig.bands.iter().map(|b| b.to_s))
        .fold(0.0f64, f64::max);
    let x_range = (0.0, (x_end * 1.02).max(1.0));
    let positive = || all().map(|p| p.1).filter(|v| *v > 0.0);
    let lat_min = positive().fold(f64::INFINITY, f64::min);
    let lat_max = positive().fold(0.0f64, f64::max);
    let (y_lo, mut y_hi) = if lat_max > 0.0 {
        decades(lat_min, lat_max * 1.5)
    } else {
        (0.1, 100.0)
    };
    // Headroom above the highest point for the band labels (written down
    // from the top edge): another decade until they fit.
    let label_px = fig
        .bands
        .iter()
        .map(|b| text_px(b.label.chars().count(), LABEL_SIZE) + 14.0)
        .fold(0.0, f64::max);
    let plot_h = f64::from(SIZE.1) - f64::from(title_h + LEGEND_H) - X_LABEL_AREA as f64;
    let top_of_data = lat_max.max(y_lo);
    while label_px > 0.0
        && (y_hi / top_of_data).log10() / (y_hi / y_lo).log10() * plot_h < label_px
        && y_hi < 1e9
    {
        y_hi *= 10.0;
    }

    let mut chart = ChartBuilder::on(&body)
        .margin_left(14)
        .margin_right(28)
        .x_label_area_size(X_LABEL_AREA)
        .y_label_area_size(72)
        // A hair below the lowest decade, so that it gets its label too.
        .build_cartesian_2d(x_range.0..x_range.1, (y_lo * 0.999..y_hi).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("seconds since the clients started (a point per reply, at its arrival)")
        .y_desc("request latency, ms (log scale)")
        .axis_desc_style(sans(16.0))
        .label_style(sans(14.0))
        .x_labels(14)
        .y_labels(10)
        .y_label_formatter(&|v| {
            if *v >= 1.0 {
                format!("{v:.0}")
            } else {
                format!("{v}")
            }
        })
        .x_max_light_lines(1)
        .light_line_style(RGBColor(0xee, 0xee, 0xee))
        .bold_line_style(RGBColor(0xdd, 0xdd, 0xdd))
        .draw()?;

    // Bands first, so the lines stay on top of them.
    let plot_px = chart.plotting_area().dim_in_pixel().0.max(1) as f64;
    let min_w = MIN_BAND_PX * (x_range.1 - x_range.0) / plot_px;
    let span = |b: &Band| {
        let (from, to) = (b.from_s.max(x_range.0), b.to_s.min(x_range.1).max(b.from_s));
        if to - from >= min_w {
            (from, to)
        } else {
            let mid = (from + to) / 2.0;
            (mid - min_w / 2.0, mid + min_w / 2.0)
        }
    };
    // Red bands (unlike the grid, and a line keeps its contrast across them), labels in the
    // colour of the series whose capsule moved.
    let label_colour = |b: &Band| b.series.map(colour).unwrap_or(BAND_COLOUR);
    chart.draw_series(fig.bands.iter().map(|b| {
        let (from, to) = span(b);
        Rectangle::new(
            [(from, y_lo * 0.999), (to, y_hi)],
            BAND_COLOUR.mix(BAND_ALPHA).filled(),
        )
    }))?;

    let columns = plot_px as usize;
    for (i, s) in fig.series.iter().enumerate() {
        let points: Vec<(f64, f64)> = thin(&s.points, x_range, columns)
            .into_iter()
            .map(|(t, l)| (t, l.max(y_lo)))
            .collect();
        // A dense series draws thinner, so that its neighbour shows through.
        let width = if points.len() > columns { 1 } else { 2 };
        chart.draw_series(LineSeries::new(points, colour(i).stroke_width(width)))?;
    }

    // Band labels, top to bottom beside each band, from the top edge.
    chart.draw_series(fig.bands.iter().map(|b| {
        let (_, to) = span(b);
        Text::new(
            b.label.clone(),
            (to, y_hi),
            sans(LABEL_SIZE)
                .transform(FontTransform::Rotate90)
                .color(&label_colour(b))
                .pos(Pos::new(HPos::Left, VPos::Bottom)),
        )
    }))?;

    // The legend, in one row under the chart: a line per series, then a
    // swatch for the shading (another opacity than the bands: not counted).
    let mut entries: Vec<(String, Option<RGBColor>)> = fig
        .series
        .iter()
        .enumerate()
        .map(|(i, s)| (s.label.clone(), Some(colour(i))))
        .collect();
    if !fig.bands.is_empty() {
        entries.push(("capsule frozen: freeze → running again".into(), None));
    }
    let widths: Vec<i32> = entries
        .iter()
        .map(|(l, _)| 30 + text_px(l.chars().count(), LEGEND_SIZE) as i32 + 28)
        .collect();
    let mut x = (SIZE.0 as i32 - widths.iter().sum::<i32>()).max(0) / 2;
    let y = LEGEND_H / 2;
    for ((label, c), w) in entries.iter().zip(&widths) {
        match c {
            Some(c) => legend.draw(&PathElement::new(
                vec![(x, y), (x + 22, y)],
                c.stroke_width(3),
            ))?,
            None => legend.draw(&Rectangle::new(
                [(x, y - 8), (x + 22, y + 8)],
                BAND_COLOUR.mix(0.3).filled(),
            ))?,
        }
        legend.draw(&Text::new(
            label.clone(),
            (x + 30, y),
            sans(LEGEND_SIZE)
                .color(&BLACK)
                .pos(Pos::new(HPos::Left, VPos::Center)),
        ))?;
        x += w;
    }
    Ok(())
}

fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// Marks the move bands (the rectangles drawn with [`BAND_ALPHA`], in band
/// order) with `class="move"` and their label as a `<title>`.
fn tag_bands(doc: &str, bands: &[Band]) -> String {
    let marker = format!("opacity=\"{BAND_ALPHA}\"");
    let mut out = String::with_capacity(doc.len() + bands.len() * 64);
    let mut rest = doc;
    let mut next = bands.iter();
    while let Some(at) = rest.find("<rect") {
        out.push_str(&rest[..at]);
        rest = &rest[at..];
        let Some(end) = rest.find("/>") else { break };
        let tag = &rest[..end];
        if tag.contains(&marker)
            && let Some(b) = next.next()
        {
            out.push_str(&format!("<rect class=\"{MOVE_CLASS}\""));
            out.push_str(&tag["<rect".len()..]);
            out.push_str(&format!(
                "><title>{}: frozen {:.1} ms</title></rect>",
                xml_escape(&b.label),
                (b.to_s - b.from_s) * 1000.0
            ));
        } else {
            out.push_str(&rest[..end + 2]);
        }
        rest = &rest[end + 2..];
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn figure(moves: usize) -> Figure {
        // Two clients over 6 s: a fast one (~1 ms) and a slow one (~40 ms),
        // each with a pause at its capsule's moves.
        let mut kv = Series {
            label: "kv INCR".into(),
            points: Vec::new(),
        };
        let mut http = Series {
            label: "http GET".into(),
            points: Vec::new(),
        };
        let mut bands = Vec::new();
        for i in 0..moves {
            let from = 0.5 + i as f64 * 0.8;
            bands.push(Band {
                label: format!(
                    "demo-{} vm{}→vm{}",
                    ["kv", "http"][i % 2],
                    1 + i % 2,
                    2 - i % 2
                ),
                from_s: from,
                to_s: from + 0.025,
                series: Some(i % 2),
            });
        }
        let mut t = 0.0;
        while t < 6.0 {
            let paused = bands
                .iter()
                .any(|b| b.series == Some(0) && (b.to_s - t).abs() < 5e-4);
            kv.points.push((t, if paused { 27.0 } else { 0.8 }));
            t += 0.001;
        }
        let mut t = 0.0;
        while t < 6.0 {
            http.points.push((t, 40.0));
            t += 0.05;
        }
        Figure {
            title: "Request latency while capsules move".into(),
            subtitle: "lab test, tcg".into(),
            series: vec![kv, http],
            bands,
        }
    }

    fn parse(doc: &str) -> roxmltree::Document<'_> {
        roxmltree::Document::parse(doc).unwrap_or_else(|e| panic!("not XML: {e}\n{doc}"))
    }

    fn moves_in(doc: &roxmltree::Document) -> usize {
        doc.descendants()
            .filter(|n| n.has_tag_name("rect") && n.attribute("class") == Some(MOVE_CLASS))
            .count()
    }

    /// Writes the test figure where `CAPSULES_PLOT_SAMPLE` says, to look at.
    #[test]
    fn sample_figure() {
        if let Some(path) = std::env::var_os("CAPSULES_PLOT_SAMPLE") {
            write_svg(&figure(6), Path::new(&path)).unwrap();
        }
    }

    #[test]
    fn svg_is_a_document_with_one_marker_per_move() {
        for moves in [0, 1, 6] {
            let svg = svg(&figure(moves)).unwrap();
            assert!(svg.trim_start().starts_with("<svg"), "{}", &svg[..80]);
            assert!(svg.trim_end().ends_with("</svg>"));
            let doc = parse(&svg);
            assert_eq!(doc.root_element().tag_name().name(), "svg");
            assert_eq!(moves_in(&doc), moves, "moves {moves}");
            assert_eq!(svg.matches("class=\"move\"").count(), moves);
        }
    }

    #[test]
    fn text_is_there_without_a_font_library() {
        let fig = figure(2);
        let svg = svg(&fig).unwrap();
        let doc = parse(&svg);
        let texts: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("text"))
            .filter_map(|n| n.text())
            .map(str::trim)
            .collect();
        for want in [
            "seconds since the clients started (a point per reply, at its arrival)",
            "request latency, ms (log scale)",
            "Request latency while capsules move",
            "lab test, tcg",
            "kv INCR",
            "http GET",
            "demo-kv vm1→vm2",
            "demo-http vm2→vm1",
            "capsule frozen: freeze → running again",
            "10",
        ] {
            assert!(texts.contains(&want), "no text {want:?} in {texts:?}");
        }
        // Each band carries its label as a title.
        let titles: Vec<&str> = doc
            .descendants()
            .filter(|n| n.has_tag_name("title"))
            .filter_map(|n| n.text())
            .map(str::trim)
            .collect();
        assert_eq!(
            titles,
            [
                "demo-kv vm1→vm2: frozen 25.0 ms",
                "demo-http vm2→vm1: frozen 25.0 ms"
            ]
        );
    }

    #[test]
    fn bands_are_visible_and_in_order() {
        let svg = svg(&figure(3)).unwrap();
        let doc = parse(&svg);
        let xs: Vec<(f64, f64)> = doc
            .descendants()
            .filter(|n| n.attribute("class") == Some(MOVE_CLASS))
            .map(|n| {
                let f = |a| n.attribute(a).unwrap().parse::<f64>().unwrap();
                (f("x"), f("width"))
            })
            .collect();
        assert_eq!(xs.len(), 3);
        assert!(xs.windows(2).all(|w| w[0].0 < w[1].0), "{xs:?}");
        // 25 ms on a 6 s axis is about 4 px: widened to be seen.
        assert!(xs.iter().all(|(_, w)| *w >= MIN_BAND_PX - 1.0), "{xs:?}");
    }

    #[test]
    fn labels_are_escaped_and_empty_figures_draw() {
        let mut fig = Figure {
            title: "a <b> & \"c\"".into(),
            ..Default::default()
        };
        fig.bands.push(Band {
            label: "x<y & z".into(),
            from_s: 1.0,
            to_s: 1.0,
            series: None,
        });
        let svg = svg(&fig).unwrap();
        let doc = parse(&svg);
        assert_eq!(moves_in(&doc), 1);
        let empty = super::svg(&Figure::default()).unwrap();
        assert_eq!(moves_in(&parse(&empty)), 0);
    }

    #[test]
    fn long_series_are_thinned_keeping_peaks() {
        let mut points: Vec<(f64, f64)> = (0..100_000).map(|i| (i as f64 * 1e-4, 1.0)).collect();
        points[54_321].1 = 90.0;
        let thinned = thin(&points, (0.0, 10.0), 1000);
        assert!(thinned.len() <= 2000, "{}", thinned.len());
        assert!(thinned.contains(&(54_321.0 * 1e-4, 90.0)));
        assert!(thinned.windows(2).all(|w| w[0].0 <= w[1].0));
        let short = vec![(0.0, 1.0), (1.0, 2.0)];
        assert_eq!(thin(&short, (0.0, 1.0), 1000), short);
    }

    #[test]
    fn y_axis_spans_whole_decades() {
        assert_eq!(decades(0.3, 240.0), (0.1, 1000.0));
        assert_eq!(decades(1.0, 1.0), (1.0, 10.0));
    }
}
