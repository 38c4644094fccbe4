//! Classification metrics: loss, accuracy, macro precision / recall / F1 (a class never predicted
//! has precision 0, as scikit-learn's zero_division=0), and RMSE / MAE of the outputs against the
//! one-hot labels when the loss is MSE.

use ndarray::{Array2, Axis};

use crate::data::{Dataset, CLASSES};
use crate::model::{Loss, Model, Params};

#[derive(Clone, Copy, Debug, Default, serde::Serialize)]
pub struct Metrics {
    pub loss: f64,
    pub accuracy: f64,
    pub precision: f64,
    pub recall: f64,
    pub f1: f64,
    pub rmse: Option<f64>,
    pub mae: Option<f64>,
}

impl std::fmt::Display for Metrics {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "loss {:.4}, acc {:.2}%, P {:.3} R {:.3} F1 {:.3}",
            self.loss,
            100.0 * self.accuracy,
            self.precision,
            self.recall,
            self.f1
        )?;
        if let (Some(r), Some(m)) = (self.rmse, self.mae) {
            write!(f, ", RMSE {r:.4} MAE {m:.4}")?;
        }
        Ok(())
    }
}

fn argmax(row: ndarray::ArrayView1<f32>) -> usize {
    row.iter()
        .enumerate()
        .fold(
            (0, f32::NEG_INFINITY),
            |a, (i, &v)| if v > a.1 { (i, v) } else { a },
        )
        .0
}

/// Metrics of `model` with parameters `p` on `data`, in batches of 1,024 rows.
pub fn evaluate(
    model: &Model,
    p: &dyn Params,
    data: &Dataset,
    loss: Loss,
) -> fusedopt::Result<Metrics> {
    let mut confusion = [[0usize; CLASSES]; CLASSES];
    let (mut loss_sum, mut se, mut ae) = (0.0f64, 0.0f64, 0.0f64);
    let idx: Vec<usize> = (0..data.len()).collect();
    for chunk in idx.chunks(1024) {
        let x: Array2<f32> = data.x.select(Axis(0), chunk);
        let y: Vec<usize> = chunk.iter().map(|&i| data.y[i]).collect();
        let logits = model.forward(p, &x)?.logits;
        loss_sum += f64::from(loss.eval(&logits, &y).0) * y.len() as f64;
        for (row, &label) in logits.axis_iter(Axis(0)).zip(&y) {
            confusion[label][argmax(row)] += 1;
            for (k, &v) in row.iter().enumerate() {
                let e = f64::from(v) - if k == label { 1.0 } else { 0.0 };
                se += e * e;
                ae += e.abs();
            }
        }
    }
    let n = data.len().max(1) as f64;
    let correct: usize = (0..CLASSES).map(|c| confusion[c][c]).sum();
    let (mut p, mut r, mut f) = (0.0, 0.0, 0.0);
    for (c, row) in confusion.iter().enumerate() {
        let tp = row[c] as f64;
        let predicted: usize = confusion.iter().map(|r| r[c]).sum();
        let actual: usize = row.iter().sum();
        let pc = if predicted > 0 {
            tp / predicted as f64
        } else {
            0.0
        };
        let rc = if actual > 0 { tp / actual as f64 } else { 0.0 };
        p += pc;
        r += rc;
        f += if pc + rc > 0.0 {
            2.0 * pc * rc / (pc + rc)
        } else {
            0.0
        };
    }
    let k = CLASSES as f64;
    let mse = loss == Loss::Mse;
    Ok(Metrics {
        loss: loss_sum / n,
        accuracy: correct as f64 / n,
        precision: p / k,
        recall: r / k,
        f1: f / k,
        rmse: mse.then(|| (se / (n * k)).sqrt()),
        mae: mse.then(|| ae / (n * k)),
    })
}
