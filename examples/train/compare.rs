//! The optimizer comparison: an lr grid judged on validation accuracy, then several seeds of the
//! best, written as a table and a loss plot.

use std::path::Path;

use clap::ValueEnum;

use crate::cli::{Args, RuleName};
use crate::data::Error;
use crate::run::{model_of, train, Run, Splits};

/// Adam, AdamW, SGD with momentum and RMSProp: each lr of a small grid trained once (seed 0) and
/// judged on the validation split; the best one trained with every seed and judged on the test set.
pub(crate) fn compare(args: &Args, splits: &Splits) -> Result<(), Error> {
    let grid: &[(RuleName, &str, [f64; 3])] = &[
        (RuleName::Adam, "Adam", [1e-3, 3e-3, 1e-2]),
        (RuleName::Adamw, "AdamW (wd 0.01)", [1e-3, 3e-3, 1e-2]),
        (RuleName::Sgd, "SGD, momentum 0.9", [0.01, 0.03, 0.1]),
        (
            RuleName::Rmsprop,
            "RMSProp, momentum 0.9",
            [1e-4, 3e-4, 1e-3],
        ),
    ];
    std::fs::create_dir_all(&args.out)?;
    let mut rows = Vec::new();
    let mut curves = Vec::new();
    for &(rule, label, lrs) in grid {
        let a = Args {
            rule,
            ..args.clone()
        };
        // Best validation accuracy; ties (a small validation split has few distinct values) go to
        // the lower validation loss.
        let mut best = (f64::NEG_INFINITY, f64::NEG_INFINITY, lrs[0]);
        for lr in lrs {
            let run = train(&a, splits, lr, 0, false)?;
            let val = *run.history.val_accuracy.last().unwrap_or(&0.0);
            let val_loss = *run.history.val_loss.last().unwrap_or(&f64::INFINITY);
            println!(
                "{label:<22} lr {lr:<7} validation accuracy {:.2}%, loss {val_loss:.4}",
                100.0 * val
            );
            if (val, -val_loss) > (best.0, best.1) {
                best = (val, -val_loss, lr);
            }
        }
        let best = (best.0, best.2);
        let runs: Vec<Run> = (0..args.seeds)
            .map(|s| train(&a, splits, best.1, s, false))
            .collect::<Result<_, _>>()?;
        let acc: Vec<f64> = runs.iter().map(|r| r.test.accuracy).collect();
        let f1: Vec<f64> = runs.iter().map(|r| r.test.f1).collect();
        let secs: Vec<f64> = runs
            .iter()
            .flat_map(|r| r.history.seconds_per_epoch.clone())
            .collect();
        let mean_curve: Vec<f64> = (0..args.epochs)
            .map(|e| runs.iter().map(|r| r.history.train_loss[e]).sum::<f64>() / runs.len() as f64)
            .collect();
        curves.push((label, mean_curve));
        rows.push(format!(
            "| {label} | {} | {:.2} ± {:.2} % | {:.3} ± {:.3} | {:.0} ms |",
            best.1,
            100.0 * mean(&acc),
            100.0 * spread(&acc),
            mean(&f1),
            spread(&f1),
            1e3 * median(secs)
        ));
    }
    let table = format!(
        "Digits ({} train / {} validation / {} test), {}, {} loss, batch {} over {} CPU replicas, {} epochs, \
         warmup + cosine schedule, clip {}; lr chosen on validation accuracy (seed 0), then {} seeds.\n\n\
         | optimizer | best lr | test accuracy (mean ± sd) | test macro F1 | time per epoch (median) |\n\
         |---|---:|---:|---:|---:|\n{}\n",
        splits.train.len(),
        splits.val.len(),
        splits.test.len(),
        model_of(args, splits.train.side).describe(),
        args.loss
            .to_possible_value()
            .map_or(String::new(), |v| v.get_name().to_string()),
        args.batch,
        args.replicas,
        args.epochs,
        args.clip,
        args.seeds,
        rows.join("\n")
    );
    std::fs::write(args.out.join("table.md"), &table)?;
    plot(&args.out.join("loss.svg"), &curves)?;
    println!(
        "\n{table}\nwrote {} and {}",
        args.out.join("table.md").display(),
        args.out.join("loss.svg").display()
    );
    Ok(())
}

pub(crate) fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Sample standard deviation.
pub(crate) fn spread(v: &[f64]) -> f64 {
    let m = mean(v);
    (v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (v.len().max(2) - 1) as f64).sqrt()
}

pub(crate) fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// Mean training-loss curves, log scale, one line per optimizer.
pub(crate) fn plot(path: &Path, curves: &[(&str, Vec<f64>)]) -> Result<(), Error> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (720, 440)).into_drawing_area();
    root.fill(&WHITE)?;
    let epochs = curves.iter().map(|c| c.1.len()).max().unwrap_or(1);
    let lo = curves
        .iter()
        .flat_map(|c| c.1.iter().copied())
        .fold(f64::INFINITY, f64::min)
        .max(1e-6);
    let hi = curves
        .iter()
        .flat_map(|c| c.1.iter().copied())
        .fold(0.0, f64::max);
    let mut chart = ChartBuilder::on(&root)
        .caption("training loss (mean over seeds)", ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(36)
        .y_label_area_size(56)
        .build_cartesian_2d(1f64..epochs as f64, (lo * 0.8..hi * 1.2).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("epoch")
        .y_desc("loss")
        .draw()?;
    let colours = [RED, BLUE, GREEN, MAGENTA, CYAN];
    for (i, (label, c)) in curves.iter().enumerate() {
        let colour = colours[i % colours.len()];
        chart
            .draw_series(LineSeries::new(
                c.iter().enumerate().map(|(e, &v)| ((e + 1) as f64, v)),
                colour.stroke_width(2),
            ))?
            .label(*label)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], colour.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE.mix(0.9))
        .draw()?;
    root.present()?;
    Ok(())
}
