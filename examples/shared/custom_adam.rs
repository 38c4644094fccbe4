//! PyTorch's Adam (ε on the corrected scale) written as a custom rule, as a user would write it:
//! bit for bit the built-in rule on the CPU engine and the GPU (tests/custom_rules.rs), and the
//! custom-rule rows of the benchmarks.

use fusedopt::CustomRule;

pub fn custom_adam(beta1: f64, beta2: f64, eps: f64) -> CustomRule {
    let mut r = CustomRule::builder("adam_custom");
    r.hyperparameter("beta1", beta1)
        .hyperparameter("beta2", beta2)
        .hyperparameter("eps", eps)
        .slot("exp_avg", 0.0)
        .slot("exp_avg_sq", 0.0)
        .coefficient("one_minus_beta1", "1 - beta1")
        .coefficient("beta2", "beta2")
        .coefficient("one_minus_beta2", "1 - beta2")
        .coefficient("step_size", "lr / (1 - beta1^t)")
        .coefficient("v_scale", "1 / (1 - beta2^t)")
        .coefficient("eps", "eps")
        .cpu(|k, p, g, s| {
            s[0] += k[0] * (g - s[0]);
            s[1] = k[1] * s[1] + k[2] * g * g;
            let denom = (s[1] * k[4]).sqrt() + k[5];
            *p -= k[3] * s[0] / denom;
        })
        .cuda(
            "s[0] = s[0] + k.one_minus_beta1 * (g - s[0]);
             s[1] = k.beta2 * s[1] + k.one_minus_beta2 * g * g;
             p = p - k.step_size * s[0] / (sqrtf(s[1] * k.v_scale) + k.eps);",
        );
    // Every part above is valid: building cannot fail.
    r.build().expect("a valid rule")
}
