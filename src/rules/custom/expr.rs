//! A custom rule's per-step coefficients, written once as arithmetic over its hyperparameters,
//! the group's `lr` and the 1-based step `t` (`"lr / (1 - beta1^t)"`), so that the CPU engine and
//! the GPU compute them with the same f64 operations in the same order (`^` is `powu`, the
//! bias-correction power both engines share).

use std::fmt;

/// A parsed coefficient expression.
#[derive(Clone, Debug, PartialEq)]
pub(crate) enum Expr {
    Number(f64),
    /// A hyperparameter, by its index.
    Hyper(usize),
    Lr,
    Step,
    Neg(Box<Expr>),
    Add(Box<Expr>, Box<Expr>),
    Sub(Box<Expr>, Box<Expr>),
    Mul(Box<Expr>, Box<Expr>),
    Div(Box<Expr>, Box<Expr>),
    /// `base ^ t` or `base ^ n` for a whole number `n`.
    Pow(Box<Expr>, Power),
    Sqrt(Box<Expr>),
}

/// The exponent of a power: the step count, or a whole number.
#[derive(Clone, Copy, Debug, PartialEq)]
pub(crate) enum Power {
    Step,
    Whole(u64),
}

/// What an expression may name: the rule's hyperparameters (besides `lr` and `t`).
pub(crate) struct Scope<'a> {
    pub hyperparameters: &'a [String],
}

impl Expr {
    /// Parses `text`, naming only `scope`'s hyperparameters, `lr`, `t` and `sqrt`; at most
    /// [`MAX_LEN`] characters nested at most [`MAX_DEPTH`] deep (a checkpoint's rule is parsed
    /// before it is compared: no input may exhaust the stack).
    pub fn parse(text: &str, scope: &Scope<'_>) -> Result<Expr, String> {
        if text.len() > MAX_LEN {
            return Err(format!("{} characters, at most {MAX_LEN}", text.len()));
        }
        let tokens = tokenize(text)?;
        let mut p = Parser {
            tokens,
            at: 0,
            depth: 0,
            scope,
        };
        let e = p.sum()?;
        match p.tokens.get(p.at) {
            None => Ok(e),
            Some(t) => Err(format!("unexpected '{t}' after a whole expression")),
        }
    }

    /// Its value for step `t` at lr `lr` with hyperparameter values `h`, in f64.
    pub fn eval(&self, h: &[f64], lr: f64, t: u64) -> f64 {
        match self {
            Expr::Number(x) => *x,
            Expr::Hyper(i) => h[*i],
            Expr::Lr => lr,
            Expr::Step => t as f64,
            Expr::Neg(a) => -a.eval(h, lr, t),
            Expr::Add(a, b) => a.eval(h, lr, t) + b.eval(h, lr, t),
            Expr::Sub(a, b) => a.eval(h, lr, t) - b.eval(h, lr, t),
            Expr::Mul(a, b) => a.eval(h, lr, t) * b.eval(h, lr, t),
            Expr::Div(a, b) => a.eval(h, lr, t) / b.eval(h, lr, t),
            Expr::Pow(a, Power::Step) => crate::rules::powu(a.eval(h, lr, t), t),
            Expr::Pow(a, Power::Whole(n)) => crate::rules::powu(a.eval(h, lr, t), *n),
            Expr::Sqrt(a) => a.eval(h, lr, t).sqrt(),
        }
    }
}

impl fmt::Display for Expr {
    /// The expression in CUDA C++ (`cuda.rs`), fully parenthesised: the same f64 operations in
    /// the same order, over `h` (the group config's hyperparameters), `lr` and `t`. Numbers are
    /// written in Rust's shortest round-trip form, which a C++ compiler reads back to the same
    /// double.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Expr::Number(x) => write!(f, "{x:?}"),
            Expr::Hyper(i) => write!(f, "h[{i}]"),
            Expr::Lr => write!(f, "lr"),
            Expr::Step => write!(f, "(double)t"),
            Expr::Neg(a) => write!(f, "(-{a})"),
            Expr::Add(a, b) => write!(f, "({a} + {b})"),
            Expr::Sub(a, b) => write!(f, "({a} - {b})"),
            Expr::Mul(a, b) => write!(f, "({a} * {b})"),
            Expr::Div(a, b) => write!(f, "({a} / {b})"),
            Expr::Pow(a, Power::Step) => write!(f, "powu({a}, t)"),
            Expr::Pow(a, Power::Whole(n)) => write!(f, "powu({a}, {n}ull)"),
            Expr::Sqrt(a) => write!(f, "sqrt({a})"),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
enum Token {
    Number(f64),
    Name(String),
    Op(char),
}

impl fmt::Display for Token {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Token::Number(x) => write!(f, "{x}"),
            Token::Name(n) => write!(f, "{n}"),
            Token::Op(c) => write!(f, "{c}"),
        }
    }
}

fn tokenize(text: &str) -> Result<Vec<Token>, String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        if c.is_whitespace() {
            i += 1;
        } else if c.is_ascii_digit() || c == '.' {
            let start = i;
            while i < chars.len()
                && (chars[i].is_ascii_alphanumeric()
                    || chars[i] == '.'
                    || ((chars[i] == '-' || chars[i] == '+')
                        && matches!(chars[i - 1], 'e' | 'E')))
            {
                i += 1;
            }
            let s: String = chars[start..i].iter().collect();
            let x = s
                .parse::<f64>()
                .ok()
                .filter(|x| x.is_finite())
                .ok_or_else(|| format!("'{s}' is not a finite number"))?;
            out.push(Token::Number(x));
        } else if c.is_ascii_alphabetic() || c == '_' {
            let start = i;
            while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                i += 1;
            }
            out.push(Token::Name(chars[start..i].iter().collect()));
        } else if "+-*/^()".contains(c) {
            out.push(Token::Op(c));
            i += 1;
        } else {
            return Err(format!("unexpected character '{c}'"));
        }
    }
    Ok(out)
}

/// The longest expression, and its deepest nesting.
pub(crate) const MAX_LEN: usize = 1024;
pub(crate) const MAX_DEPTH: usize = 64;

struct Parser<'a> {
    tokens: Vec<Token>,
    at: usize,
    depth: usize,
    scope: &'a Scope<'a>,
}

impl Parser<'_> {
    fn peek_op(&self, op: char) -> bool {
        self.tokens.get(self.at) == Some(&Token::Op(op))
    }

    fn next(&mut self) -> Option<Token> {
        let t = self.tokens.get(self.at).cloned();
        self.at += 1;
        t
    }

    fn sum(&mut self) -> Result<Expr, String> {
        self.depth += 1;
        if self.depth > MAX_DEPTH {
            return Err(format!("nested more than {MAX_DEPTH} deep"));
        }
        let e = self.sum_here();
        self.depth -= 1;
        e
    }

    fn sum_here(&mut self) -> Result<Expr, String> {
        let mut e = self.product()?;
        loop {
            if self.peek_op('+') {
                self.at += 1;
                e = Expr::Add(Box::new(e), Box::new(self.product()?));
            } else if self.peek_op('-') {
                self.at += 1;
                e = Expr::Sub(Box::new(e), Box::new(self.product()?));
            } else {
                return Ok(e);
            }
        }
    }

    fn product(&mut self) -> Result<Expr, String> {
        let mut e = self.unary()?;
        loop {
            if self.peek_op('*') {
                self.at += 1;
                e = Expr::Mul(Box::new(e), Box::new(self.unary()?));
            } else if self.peek_op('/') {
                self.at += 1;
                e = Expr::Div(Box::new(e), Box::new(self.unary()?));
            } else {
                return Ok(e);
            }
        }
    }

    fn unary(&mut self) -> Result<Expr, String> {
        if self.peek_op('-') {
            self.at += 1;
            self.depth += 1;
            if self.depth > MAX_DEPTH {
                return Err(format!("nested more than {MAX_DEPTH} deep"));
            }
            let e = self.unary();
            self.depth -= 1;
            return Ok(Expr::Neg(Box::new(e?)));
        }
        self.power()
    }

    fn power(&mut self) -> Result<Expr, String> {
        let base = self.atom()?;
        if !self.peek_op('^') {
            return Ok(base);
        }
        self.at += 1;
        let exponent = match self.next() {
            Some(Token::Name(n)) if n == "t" => Power::Step,
            Some(Token::Number(x)) if x >= 0.0 && x.fract() == 0.0 && x < 1e9 => {
                Power::Whole(x as u64)
            }
            other => {
                return Err(format!(
                    "the exponent of '^' must be t or a whole number, got {}",
                    other.map_or("nothing".into(), |t| t.to_string())
                ))
            }
        };
        Ok(Expr::Pow(Box::new(base), exponent))
    }

    fn atom(&mut self) -> Result<Expr, String> {
        match self.next() {
            Some(Token::Number(x)) => Ok(Expr::Number(x)),
            Some(Token::Op('(')) => {
                let e = self.sum()?;
                match self.next() {
                    Some(Token::Op(')')) => Ok(e),
                    _ => Err("a '(' is not closed".into()),
                }
            }
            Some(Token::Name(n)) if n == "sqrt" => {
                if !self.peek_op('(') {
                    return Err("sqrt takes its argument in parentheses".into());
                }
                Ok(Expr::Sqrt(Box::new(self.atom()?)))
            }
            Some(Token::Name(n)) if n == "lr" => Ok(Expr::Lr),
            Some(Token::Name(n)) if n == "t" => Ok(Expr::Step),
            Some(Token::Name(n)) => self
                .scope
                .hyperparameters
                .iter()
                .position(|h| *h == n)
                .map(Expr::Hyper)
                .ok_or_else(|| format!("'{n}' is not a hyperparameter, lr, t or sqrt")),
            Some(t) => Err(format!("unexpected '{t}'")),
            None => Err("the expression ends early".into()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn eval(text: &str, lr: f64, t: u64) -> Result<f64, String> {
        let names = ["beta1".to_string(), "beta2".to_string()];
        let e = Expr::parse(
            text,
            &Scope {
                hyperparameters: &names,
            },
        )?;
        Ok(e.eval(&[0.9, 0.999], lr, t))
    }

    /// Written as the built-in rules write their coefficients, with the same bits.
    #[test]
    fn expressions_compute_what_the_rules_compute() {
        let step = eval("lr / (1 - beta1^t)", 0.01, 7).unwrap();
        assert_eq!(step, 0.01 / (1.0 - crate::rules::powu(0.9, 7)));
        let v = eval("1 / (1 - beta2 ^ t)", 0.0, 3).unwrap();
        assert_eq!(v, 1.0 / (1.0 - crate::rules::powu(0.999, 3)));
        assert_eq!(eval("-beta1 * 2 + 3 - 1e-3", 0.0, 1).unwrap(), -0.9 * 2.0 + 3.0 - 1e-3);
        assert_eq!(eval("sqrt(1 - beta2^2)", 0.0, 1).unwrap(), (1.0f64 - 0.999 * 0.999).sqrt());
        assert_eq!(eval("2 - 3 - 4", 0.0, 1).unwrap(), -5.0);
        assert_eq!(eval("8 / 4 / 2", 0.0, 1).unwrap(), 1.0);
        assert_eq!(eval("2.5e-3 * t", 0.0, 4).unwrap(), 0.01);
    }

    #[test]
    fn expressions_are_written_for_cuda_with_every_operation_in_place() {
        let names = ["beta1".to_string()];
        let scope = Scope {
            hyperparameters: &names,
        };
        let e = Expr::parse("-lr / (1 - beta1^t) * sqrt(2.5e-3 + t) - beta1^2", &scope).unwrap();
        assert_eq!(
            e.to_string(),
            "((((-lr) / (1.0 - powu(h[0], t))) * sqrt((0.0025 + (double)t))) - powu(h[0], 2ull))"
        );
        // Every f64 literal is written so that it reads back as the same double.
        for x in [0.1, 1e-8, 1e300, 0.999, 1.0 / 3.0, 5e-324] {
            let text = Expr::Number(x).to_string();
            assert_eq!(text.parse::<f64>().unwrap().to_bits(), x.to_bits(), "{text}");
            assert!(text.contains('.') || text.contains('e'), "{text} reads as an integer");
        }
    }

    #[test]
    fn bad_expressions_say_why() {
        for (text, why) in [
            ("gamma * lr", "'gamma' is not a hyperparameter"),
            ("beta1 ^ 0.5", "must be t or a whole number"),
            ("(lr", "not closed"),
            ("lr lr", "unexpected 'lr'"),
            ("lr $ 2", "unexpected character"),
            ("lr *", "ends early"),
            ("sqrt lr", "parentheses"),
            ("1e999 * lr", "not a finite number"),
        ] {
            let err = eval(text, 0.1, 1).unwrap_err();
            assert!(err.contains(why), "{text}: {err}");
        }
        // No input exhausts the stack: nesting and length are bounded.
        for (text, why) in [
            (format!("{}lr{}", "(".repeat(100), ")".repeat(100)), "nested more than"),
            (format!("{}lr", "-".repeat(100)), "nested more than"),
            ("lr+".repeat(400), "characters, at most"),
        ] {
            let err = eval(&text, 0.1, 1).unwrap_err();
            assert!(err.contains(why), "{err}");
        }
    }
}
