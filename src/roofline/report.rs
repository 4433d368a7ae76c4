//! `bench --report DIR`: a markdown table and an SVG plot (time against tokens, with the
//! floor line), written atomically (temporary file, then rename).

use std::fmt::Write as _;
use std::path::Path;

use crate::roofline::{BenchRow, MachineFloor};

/// The markdown report: the machine's floor, then one table row per result.
pub fn markdown(rows: &[BenchRow], floor: &MachineFloor, command: &str, machine: &str) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# MoE layer benchmark\n");
    let _ = writeln!(s, "Command: `{command}`  ");
    let _ = writeln!(s, "Machine: {machine}  ");
    let _ = writeln!(
        s,
        "Floor inputs (measured in the same run, before the timings and after each batch size; the best of each): copy {:.1} GB/s (read + written), read {:.1} GB/s, bf16 matmul {:.1} GFLOP/s.\n",
        floor.copy_bytes_per_s / 1e9,
        floor.read_bytes_per_s / 1e9,
        floor.matmul_flop_per_s / 1e9
    );
    let _ = writeln!(
        s,
        "Layer: dots.llm1 MoE (H 4096, E 128, I 1408, top-6, 2 shared), seeded synthetic bf16 weights, uniform random inputs.\n"
    );
    let _ = writeln!(s, "| backend | tokens | median | GB/s | TFLOP/s | floor | floor / time |");
    let _ = writeln!(s, "|---|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let _ = writeln!(
            s,
            "| {} | {} | {} | {:.1} | {:.3} | {} | {:.2} |",
            r.backend,
            r.tokens,
            fmt_us(r.median_us),
            r.gb_per_s,
            r.tflop_per_s,
            fmt_us(r.floor_us),
            r.floor_ratio
        );
    }
    s
}

/// Microseconds as `us` or `ms`.
pub fn fmt_us(us: f64) -> String {
    if us >= 1000.0 { format!("{:.1} ms", us / 1000.0) } else { format!("{us:.0} us") }
}

/// An SVG plot, log-log: median time per backend and the floor, against tokens.
pub fn svg(rows: &[BenchRow]) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 440.0, 80.0, 150.0, 30.0, 60.0);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    if rows.is_empty() {
        s.push_str("<text x=\"20\" y=\"40\">no results</text>\n</svg>\n");
        return s;
    }
    let tokens = rows.iter().map(|r| r.tokens.max(1) as f64);
    let times = rows.iter().flat_map(|r| [r.median_us, r.floor_us]).filter(|t| *t > 0.0);
    let (tmin, tmax) = tokens.fold((f64::MAX, f64::MIN), |(a, b), t| (a.min(t), b.max(t)));
    let (ymin, ymax) = times.fold((f64::MAX, f64::MIN), |(a, b), t| (a.min(t), b.max(t)));
    let (lx0, lx1) = (tmin.log10(), tmax.log10().max(tmin.log10() + 1e-9));
    let (ly0, ly1) = ((ymin / 1.5).log10().floor(), (ymax * 1.5).log10().ceil());
    let px = |t: f64| left + (t.max(1.0).log10() - lx0) / (lx1 - lx0) * (w - left - right);
    let py = |us: f64| top + (ly1 - us.max(1e-3).log10()) / (ly1 - ly0) * (h - top - bottom);
    let _ = writeln!(
        s,
        "<line x1=\"{left}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>",
        h - bottom,
        w - right,
        h - bottom
    );
    let _ = writeln!(s, "<line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{}\" stroke=\"black\"/>", h - bottom);
    let mut decade = ly0;
    while decade <= ly1 {
        let y = py(10f64.powf(decade));
        let _ = writeln!(s, "<line x1=\"{left}\" y1=\"{y:.1}\" x2=\"{}\" y2=\"{y:.1}\" stroke=\"#ddd\"/>", w - right);
        let _ = writeln!(
            s,
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{}</text>",
            left - 6.0,
            y + 4.0,
            fmt_us(10f64.powf(decade))
        );
        decade += 1.0;
    }
    let mut ticks: Vec<usize> = rows.iter().map(|r| r.tokens).collect();
    ticks.sort();
    ticks.dedup();
    for t in &ticks {
        let x = px(*t as f64);
        let _ = writeln!(s, "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{t}</text>", h - bottom + 18.0);
    }
    let _ = writeln!(
        s,
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\">tokens (log)</text>",
        (left + w - right) / 2.0,
        h - 15.0
    );
    let _ = writeln!(
        s,
        "<text x=\"18\" y=\"{}\" transform=\"rotate(-90 18 {})\" text-anchor=\"middle\">time per layer (log)</text>",
        h / 2.0,
        h / 2.0
    );
    let mut backends: Vec<&str> = rows.iter().map(|r| r.backend.as_str()).collect();
    backends.dedup();
    let colors = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd"];
    let mut legend_y = top + 10.0;
    for (bi, backend) in backends.iter().enumerate() {
        let color = colors[bi % colors.len()];
        let mine: Vec<&BenchRow> = rows.iter().filter(|r| r.backend == *backend).collect();
        let line = |f: &dyn Fn(&BenchRow) -> f64| {
            mine.iter().map(|r| format!("{:.1},{:.1}", px(r.tokens as f64), py(f(r)))).collect::<Vec<_>>().join(" ")
        };
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-width=\"2\" points=\"{}\"/>",
            line(&|r| r.median_us)
        );
        let _ = writeln!(
            s,
            "<polyline fill=\"none\" stroke=\"{color}\" stroke-dasharray=\"6 4\" points=\"{}\"/>",
            line(&|r| r.floor_us)
        );
        for r in &mine {
            let _ = writeln!(
                s,
                "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{color}\"/>",
                px(r.tokens as f64),
                py(r.median_us)
            );
        }
        let lx = w - right + 12.0;
        let _ = writeln!(
            s,
            "<line x1=\"{lx}\" y1=\"{legend_y}\" x2=\"{}\" y2=\"{legend_y}\" stroke=\"{color}\" stroke-width=\"2\"/>",
            lx + 24.0
        );
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\">{backend}</text>", lx + 30.0, legend_y + 4.0);
        legend_y += 18.0;
        let _ = writeln!(
            s,
            "<line x1=\"{lx}\" y1=\"{legend_y}\" x2=\"{}\" y2=\"{legend_y}\" stroke=\"{color}\" stroke-dasharray=\"6 4\"/>",
            lx + 24.0
        );
        let _ = writeln!(s, "<text x=\"{}\" y=\"{}\">{backend} floor</text>", lx + 30.0, legend_y + 4.0);
        legend_y += 22.0;
    }
    s.push_str("</svg>\n");
    s
}

/// Writes `contents` to `path` via a temporary file in the same folder and a rename, so
/// a failure never leaves a half-written file.
pub fn write_atomic(path: &Path, contents: &str) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents)?;
    std::fs::rename(&tmp, path)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(backend: &str, tokens: usize, median_us: f64) -> BenchRow {
        BenchRow {
            backend: backend.into(),
            tokens,
            median_us,
            gb_per_s: 1.0,
            tflop_per_s: 0.1,
            floor_us: median_us / 2.0,
            floor_ratio: 0.5,
        }
    }

    #[test]
    fn markdown_and_svg_hold_every_row() {
        let rows = vec![row("cpu", 1, 12_000.0), row("cpu", 16, 95_000.0), row("cpu", 1024, 900_000.0)];
        let floor = MachineFloor { copy_bytes_per_s: 27e9, read_bytes_per_s: 30e9, matmul_flop_per_s: 300e9 };
        let md = markdown(&rows, &floor, "dots-moe bench", "test");
        assert_eq!(md.lines().filter(|l| l.starts_with("| cpu |")).count(), 3);
        assert!(md.contains("| cpu | 16 | 95.0 ms |"));
        let plot = svg(&rows);
        assert!(plot.starts_with("<svg") && plot.trim_end().ends_with("</svg>"));
        assert_eq!(plot.matches("<circle").count(), 3);
        assert!(!plot.contains("NaN") && !plot.contains("inf"));
    }
}
