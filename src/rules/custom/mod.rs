//! Custom rules: a user-written element-wise update that runs in the same fused pass as the
//! built-in rules — the same launch plan, clipping and loss scaling folded into the gradient,
//! weight decay, non-finite policy, mixed precision, bf16 state, checkpoints and data
//! parallelism.
//!
//! A rule is its name, its hyperparameters (named numbers), its state slots (names and initial
//! values), its per-step coefficients (arithmetic over the hyperparameters, `lr` and the step `t`,
//! `expr.rs`, evaluated once per step and group in f64), and its per-element update: a Rust
//! function for the CPU engine (`math.rs`) and the same body in CUDA C++ for the GPU.
//!
//! ```
//! # use fusedopt::CustomRule;
//! // Sign momentum: m = β·m + (1−β)·g; θ −= lr·sign(m).
//! let mut r = CustomRule::builder("sign_momentum");
//! r.hyperparameter("beta", 0.9)
//!     .slot("m", 0.0)
//!     .coefficient("lr", "lr")
//!     .coefficient("beta", "beta")
//!     .coefficient("one_minus_beta", "1 - beta")
//!     .cpu(|k, p, g, s| {
//!         s[0] = k[1] * s[0] + k[2] * g;
//!         *p -= k[0] * if s[0] > 0.0 { 1.0 } else if s[0] < 0.0 { -1.0 } else { 0.0 };
//!     })
//!     .cuda("s[0] = k.beta * s[0] + k.one_minus_beta * g;
//!            p -= k.lr * (s[0] > 0.0f ? 1.0f : (s[0] < 0.0f ? -1.0f : 0.0f));");
//! let rule = r.build()?;
//! # Ok::<(), fusedopt::Error>(())
//! ```
//!
//! The CPU function gets the coefficients in the order they were declared, the parameter (weight
//! decay applied), the gradient (clip factor, loss-scale inverse and the sign of `maximize`
//! applied) and the state in slot order, widened to f32. The CUDA body sees the same as `k.<name>`,
//! `p`, `g` and `s[i]`: the rule's kernel family is generated from it and its coefficients
//! (`cuda.rs`) and compiled by NVRTC into the update template when an optimizer is first built
//! on a GPU with it (once per process and architecture, for every gradient and state dtype), so a
//! step adds no host work; a body NVRTC refuses is a typed error with its log and the line of the
//! body it points at. Checkpoints record the rule's name, hyperparameters, slots, coefficients
//! and CUDA body: a checkpoint loads only into the same rule.

mod cuda;
mod expr;
mod math;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};

use super::{Common, Decay, DeviceConfig, RuleSpec, StateInit, StepContext};
use crate::error::{Error, Result};
use crate::Device;
pub(crate) use cuda::GeneratedFamily;
use expr::{Expr, Scope};
pub(crate) use math::CustomCoefficients;
pub use math::{CoefficientValues, SlotValues};
use math::{ElementKernel, Elementwise, StepArgs};

/// At most this many per-step coefficients (they travel in the group's config on the GPU).
pub const MAX_COEFFICIENTS: usize = 8;
/// At most this many hyperparameters.
pub const MAX_HYPERPARAMETERS: usize = 8;
/// At most this many state slots, as for the built-in rules.
pub const MAX_SLOTS: usize = 3;

/// Names an expression gives its own meaning, so no hyperparameter can take them.
const EXPRESSION_NAMES: &[&str] = &["lr", "t", "sqrt"];
/// The CUDA coefficients' own fields and C++'s keywords, so no coefficient (a field of the
/// generated coefficients) can take them.
const CUDA_FIELDS: &[&str] = &[
    "gscale", "decay", "alignas", "alignof", "asm", "auto", "bool", "break", "case", "catch",
    "char", "class", "const", "constexpr", "const_cast", "continue", "decltype", "default",
    "delete", "do", "double", "dynamic_cast", "else", "enum", "explicit", "export", "extern",
    "false", "float", "for", "friend", "goto", "if", "inline", "int", "long", "mutable",
    "namespace", "new", "noexcept", "nullptr", "operator", "private", "protected", "public",
    "register", "reinterpret_cast", "return", "short", "signed", "sizeof", "static",
    "static_assert", "static_cast", "struct", "switch", "template", "this", "thread_local",
    "throw", "true", "try", "typedef", "typeid", "typename", "union", "unsigned", "using",
    "virtual", "void", "volatile", "wchar_t", "while", "and", "and_eq", "bitand", "bitor", "compl",
    "not", "not_eq", "or", "or_eq", "xor", "xor_eq", "char16_t", "char32_t", "NULL", "NAN",
    "INFINITY",
];

/// A user-written rule (see the module docs). Built by [`CustomRule::builder`].
#[derive(Clone)]
pub struct CustomRule {
    pub common: Common,
    config: Config,
    parsed: Vec<Expr>,
    cpu: Option<Arc<dyn ElementKernel>>,
    state_names: &'static [&'static str],
    family: &'static str,
}

/// What a custom rule is, as checkpoints record it (its CPU function is code, not data).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Config {
    #[serde(flatten)]
    common: Common,
    name: String,
    hyperparameters: Vec<(String, f64)>,
    slots: Vec<(String, f32)>,
    coefficients: Vec<(String, String)>,
    cuda: String,
}

/// Builds a [`CustomRule`]: everything is checked at [`CustomRuleBuilder::build`].
#[derive(Clone, Default)]
pub struct CustomRuleBuilder {
    name: String,
    hyperparameters: Vec<(String, f64)>,
    slots: Vec<(String, f32)>,
    coefficients: Vec<(String, String)>,
    cuda: String,
    cpu: Option<Arc<dyn ElementKernel>>,
}

impl CustomRule {
    /// A rule named `name` (a C identifier: it names its kernels).
    pub fn builder(name: &str) -> CustomRuleBuilder {
        CustomRuleBuilder {
            name: name.to_string(),
            ..Default::default()
        }
    }

    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// A hyperparameter's value.
    pub fn hyperparameter(&self, name: &str) -> Option<f64> {
        let h = &self.config.hyperparameters;
        h.iter().find(|(n, _)| n == name).map(|(_, v)| *v)
    }

    /// The CUDA body, as given.
    pub fn cuda_body(&self) -> &str {
        &self.config.cuda
    }

    fn from_config(config: Config, cpu: Option<Arc<dyn ElementKernel>>) -> Result<Self> {
        let parsed = validate(&config)?;
        let names: Vec<&'static str> = config.slots.iter().map(|(n, _)| intern(n)).collect();
        Ok(CustomRule {
            common: config.common,
            state_names: intern_list(names),
            family: intern(&cuda::family_name(&config, &parsed)),
            parsed,
            config,
            cpu,
        })
    }

    fn config(&self) -> Config {
        Config {
            common: self.common,
            ..self.config.clone()
        }
    }
}

impl CustomRuleBuilder {
    /// A named hyperparameter (its value is part of the rule, and of its checkpoints).
    pub fn hyperparameter(&mut self, name: &str, value: f64) -> &mut Self {
        self.hyperparameters.push((name.to_string(), value));
        self
    }

    /// A state buffer, as long as the parameters, starting at `initial` everywhere.
    pub fn slot(&mut self, name: &str, initial: f32) -> &mut Self {
        self.slots.push((name.to_string(), initial));
        self
    }

    /// A per-step coefficient: `expression` over the hyperparameters, `lr` (the group's) and `t`
    /// (the 1-based step), with `+ - * /`, `^` (by `t` or a whole number) and `sqrt(…)`.
    pub fn coefficient(&mut self, name: &str, expression: &str) -> &mut Self {
        self.coefficients
            .push((name.to_string(), expression.to_string()));
        self
    }

    /// The per-element update on the CPU: `f(coefficients, &mut param, grad, state)`, the
    /// coefficients in declaration order and the state in slot order (fixed-size arrays, so
    /// that indexing them costs nothing; the entries past the rule's own are unused).
    pub fn cpu<F>(&mut self, f: F) -> &mut Self
    where
        F: Fn(&CoefficientValues, &mut f32, f32, &mut SlotValues) + Send + Sync + 'static,
    {
        self.cpu = Some(Arc::new(Elementwise(f)));
        self
    }

    /// The same update in CUDA C++: statements over `k.<coefficient>`, `float& p`, `float g` and
    /// `float* s`.
    pub fn cuda(&mut self, body: &str) -> &mut Self {
        self.cuda = body.to_string();
        self
    }

    /// The rule, or a typed error naming the first problem.
    pub fn build(&self) -> Result<CustomRule> {
        if self.cpu.is_none() {
            return Err(bad(&self.name, "no CPU update: give one with .cpu(…)"));
        }
        let config = Config {
            common: Common::default(),
            name: self.name.clone(),
            hyperparameters: self.hyperparameters.clone(),
            slots: self.slots.clone(),
            coefficients: self.coefficients.clone(),
            cuda: self.cuda.clone(),
        };
        CustomRule::from_config(config, self.cpu.clone())
    }
}

fn bad(rule: &str, why: impl Into<String>) -> Error {
    Error::CustomRule {
        rule: rule.to_string(),
        reason: why.into(),
    }
}

fn is_identifier(s: &str) -> bool {
    let mut c = s.chars();
    matches!(c.next(), Some(x) if x.is_ascii_alphabetic() || x == '_')
        && c.all(|x| x.is_ascii_alphanumeric() || x == '_')
        && s.len() <= 64
}

/// Checks a rule's configuration; returns its coefficients parsed.
fn validate(c: &Config) -> Result<Vec<Expr>> {
    let err = |why: String| bad(&c.name, why);
    if !is_identifier(&c.name) {
        return Err(err("its name must be a C identifier of at most 64 characters".into()));
    }
    let mut seen = BTreeSet::new();
    let names = c.hyperparameters.iter().map(|(n, _)| ("hyperparameter", n));
    let names = names.chain(c.slots.iter().map(|(n, _)| ("slot", n)));
    for (what, n) in names.chain(c.coefficients.iter().map(|(n, _)| ("coefficient", n))) {
        let (reserved, which): (&[&str], &str) = match what {
            "hyperparameter" => (EXPRESSION_NAMES, "lr, t and sqrt"),
            "coefficient" => (CUDA_FIELDS, "gscale, decay, C++'s keywords and reserved names"),
            _ => (&[], "none"),
        };
        // Names with a double underscore or an underscore and a capital are the compiler's.
        let compilers = what == "coefficient" && (n.starts_with("__") || n.starts_with("_") && n[1..].starts_with(|c: char| c.is_ascii_uppercase()));
        if !is_identifier(n) || reserved.contains(&n.as_str()) || compilers {
            return Err(err(format!(
                "{what} '{n}' must be a C identifier, of which {which} are taken"
            )));
        }
        if !seen.insert((what, n)) {
            return Err(err(format!("{what} '{n}' is declared twice")));
        }
    }
    for (what, n, max) in [
        ("hyperparameters", c.hyperparameters.len(), MAX_HYPERPARAMETERS),
        ("state slots", c.slots.len(), MAX_SLOTS),
        ("coefficients", c.coefficients.len(), MAX_COEFFICIENTS),
    ] {
        if n > max {
            return Err(err(format!("{n} {what}, at most {max}")));
        }
    }
    if let Some((n, v)) = c.hyperparameters.iter().find(|(_, v)| !v.is_finite()) {
        return Err(err(format!("hyperparameter '{n}' is {v}")));
    }
    if let Some((n, v)) = c.slots.iter().find(|(_, v)| !v.is_finite()) {
        return Err(err(format!("slot '{n}' starts at {v}")));
    }
    let hyper: Vec<String> = c.hyperparameters.iter().map(|(n, _)| n.clone()).collect();
    let scope = Scope {
        hyperparameters: &hyper,
    };
    let parsed = c
        .coefficients
        .iter()
        .map(|(n, text)| {
            Expr::parse(text, &scope).map_err(|e| err(format!("coefficient '{n}' = \"{text}\": {e}")))
        })
        .collect::<Result<Vec<_>>>()?;
    check_cuda_body(c).map_err(err)?;
    c.common.validate()?;
    Ok(parsed)
}

/// What can be checked of a CUDA body before compiling it: it says something, names only
/// declared coefficients as `k.<name>`, and indexes only declared slots as `s[<i>]`.
fn check_cuda_body(c: &Config) -> std::result::Result<(), String> {
    let body = &c.cuda;
    if body.trim().is_empty() {
        return Err("no CUDA body: give one with .cuda(…)".into());
    }
    if body.contains('\0') {
        return Err("the CUDA body holds a NUL character".into());
    }
    let bytes = body.as_bytes();
    let is_word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let word_start = |i: usize| i == 0 || !is_word(bytes[i - 1]);
    // The identifier (ASCII, so whole characters) starting at byte `i`.
    let ident_at = |i: usize| {
        let end = (i..bytes.len()).find(|&j| !is_word(bytes[j])).unwrap_or(bytes.len());
        String::from_utf8_lossy(&bytes[i..end]).into_owned()
    };
    for (line_no, line_start) in std::iter::once(0)
        .chain(body.match_indices('\n').map(|(i, _)| i + 1))
        .enumerate()
    {
        let line_end = body[line_start..]
            .find('\n')
            .map_or(body.len(), |j| line_start + j);
        for i in line_start..line_end {
            if !word_start(i) {
                continue;
            }
            if bytes[i..].starts_with(b"k.") {
                let name = ident_at(i + 2);
                if !c.coefficients.iter().any(|(n, _)| *n == name) {
                    return Err(format!(
                        "CUDA body line {}: 'k.{name}' is not a coefficient",
                        line_no + 1
                    ));
                }
            }
            if bytes[i..].starts_with(b"s[") {
                let index = ident_at(i + 2);
                match index.parse::<usize>() {
                    Ok(j) if j < c.slots.len() => {}
                    _ => {
                        return Err(format!(
                            "CUDA body line {}: 's[{index}]' is not one of the {} slots",
                            line_no + 1,
                            c.slots.len()
                        ))
                    }
                }
            }
        }
    }
    Ok(())
}

/// A name, leaked once per distinct name (the engines take slot names and kernel families as
/// `&'static str`; a program declares few rules).
fn intern(name: &str) -> &'static str {
    static NAMES: Mutex<BTreeSet<&'static str>> = Mutex::new(BTreeSet::new());
    let mut names = NAMES.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(n) = names.get(name) {
        return n;
    }
    let leaked: &'static str = Box::leak(name.to_string().into_boxed_str());
    names.insert(leaked);
    leaked
}

fn intern_list(list: Vec<&'static str>) -> &'static [&'static str] {
    static LISTS: Mutex<Vec<&'static [&'static str]>> = Mutex::new(Vec::new());
    let mut lists = LISTS.lock().unwrap_or_else(|e| e.into_inner());
    if let Some(l) = lists.iter().find(|l| **l == list.as_slice()) {
        return l;
    }
    let leaked: &'static [&'static str] = Box::leak(list.into_boxed_slice());
    lists.push(leaked);
    leaked
}

impl RuleSpec for CustomRule {
    type Coefficients = CustomCoefficients;

    fn common(&self) -> &Common {
        &self.common
    }

    fn validate(&self) -> Result<()> {
        validate(&self.config()).map(|_| ())
    }

    fn runnable_on(&self, device: Device) -> Result<()> {
        match device {
            Device::Cpu if self.cpu.is_some() => Ok(()),
            Device::Cpu => Err(bad(
                &self.config.name,
                "read back without its CPU update (a checkpoint holds none): build it again",
            )),
            Device::Cuda(_) => Ok(()),
        }
    }

    fn state_names(&self) -> &'static [&'static str] {
        self.state_names
    }

    fn state_init(&self, name: &str) -> StateInit {
        let slot = self.config.slots.iter().find(|(n, _)| n == name);
        StateInit::Value(slot.map_or(0.0, |(_, v)| *v))
    }

    fn family(&self) -> &'static str {
        self.family
    }

    fn generated_family(&self) -> Option<GeneratedFamily> {
        Some(GeneratedFamily::new(&self.config, &self.parsed, self.family))
    }

    /// Params are the hyperparameters, in declaration order.
    fn device_config(&self) -> DeviceConfig {
        let mut params = [0.0; 8];
        for (p, (_, v)) in params.iter_mut().zip(&self.config.hyperparameters) {
            *p = *v;
        }
        DeviceConfig { flags: 0, params }
    }

    fn coefficients(&self, ctx: &StepContext) -> CustomCoefficients {
        let mut h = [0.0; MAX_HYPERPARAMETERS];
        for (x, (_, v)) in h.iter_mut().zip(&self.config.hyperparameters) {
            *x = *v;
        }
        let mut values = [0.0f32; MAX_COEFFICIENTS];
        for (v, e) in values.iter_mut().zip(&self.parsed) {
            *v = e.eval(&h, ctx.lr, ctx.step) as f32;
        }
        CustomCoefficients {
            args: StepArgs {
                gscale: ctx.grad_scale as f32,
                decay: Decay::new(ctx.weight_decay, ctx.lr),
                values,
            },
            // The optimizer refuses a rule without it (runnable_on) before any step.
            kernel: self.cpu.clone().unwrap_or_else(|| Arc::new(math::Unrunnable)),
        }
    }
}

impl std::fmt::Debug for CustomRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.config().fmt(f)
    }
}

impl PartialEq for CustomRule {
    /// The same configuration (two CPU functions cannot be compared).
    fn eq(&self, other: &Self) -> bool {
        self.config() == other.config()
    }
}

impl Serialize for CustomRule {
    fn serialize<S: serde::Serializer>(&self, s: S) -> std::result::Result<S::Ok, S::Error> {
        self.config().serialize(s)
    }
}

impl<'de> Deserialize<'de> for CustomRule {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        let config = Config::deserialize(d)?;
        CustomRule::from_config(config, None).map_err(serde::de::Error::custom)
    }
}
