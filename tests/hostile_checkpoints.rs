//! Hostile checkpoints: every flipped header bit, edited headers resealed with a valid checksum,
//! concurrent and killed saves, planted links, FIFOs, headers too large to load, and loads into a
//! differently configured optimizer. A refused load never changes the optimizer.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use fusedopt::schedule::{keras, torch, Counted};
use fusedopt::*;
use safetensors::tensor::{Dtype, SafeTensors, TensorView};
use serde_json::Value;

const FORMAT: &str = "fusedopt-checkpoint-2";

fn params(names: [&str; 2]) -> ParamSet {
    let mut b = ParamSet::builder();
    b.group("no_decay", GroupOptions::no_decay()).unwrap();
    b.add(names[0], &[2, 3], &[0.5, -0.5, 0.25, 1.0, -1.0, 0.75])
        .unwrap();
    b.add_to("no_decay", names[1], &[3], &[0.1, 0.2, 0.3])
        .unwrap();
    b.build(Device::Cpu).unwrap()
}

fn options() -> OptimizerOptions {
    OptimizerOptions {
        clip: Some(GlobalNormClip::new(1.0, Flavor::PyTorch)),
        loss_scale: LossScale::dynamic(),
        ..Default::default()
    }
}

fn optimizer() -> Optimizer {
    Optimizer::with_options(
        params(["w", "b"]),
        Adam::adamw(Flavor::PyTorch),
        1e-3,
        options(),
    )
    .unwrap()
}

fn run(opt: &mut Optimizer, steps: usize, seed: f32) {
    for s in 0..steps {
        let g = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i as f32 + 1.0) * (s as f32 + seed)).sin())
                .collect()
        };
        opt.params_mut().set_grad("w", &g(6)).unwrap();
        opt.params_mut().set_grad("b", &g(3)).unwrap();
        opt.step().unwrap();
    }
}

/// Everything a load may change, as bits.
fn observable(opt: &Optimizer) -> Vec<u64> {
    let mut out = vec![
        opt.step_count().unwrap(),
        opt.lr().to_bits(),
        opt.loss_scale().unwrap().to_bits(),
    ];
    for t in ["w", "b"] {
        out.extend(
            opt.params()
                .param(t)
                .unwrap()
                .iter()
                .map(|x| x.to_bits() as u64),
        );
        for s in opt.state_names() {
            out.extend(opt.state(s, t).unwrap().iter().map(|x| x.to_bits() as u64));
        }
    }
    out
}

fn saved(dir: &Path) -> (PathBuf, Vec<u8>) {
    let path = dir.join("opt.safetensors");
    let mut opt = optimizer();
    run(&mut opt, 3, 0.5);
    opt.save_checkpoint(&path).unwrap();
    let bytes = std::fs::read(&path).unwrap();
    (path, bytes)
}

fn refused(opt: &mut Optimizer, path: &Path, what: &str) {
    let before = observable(opt);
    match opt.load_checkpoint(path) {
        Err(Error::BadCheckpoint { .. }) | Err(Error::Io { .. }) => {}
        other => panic!("{what}: expected a refused load, got {other:?}"),
    }
    assert_eq!(
        observable(opt),
        before,
        "{what}: a refused load changed the optimizer"
    );
}

#[test]
fn every_flipped_header_bit_is_refused_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let (path, good) = saved(dir.path());
    let header_len = 8 + u64::from_le_bytes(good[..8].try_into().unwrap()) as usize;
    let mut target = optimizer();
    run(&mut target, 1, 2.0);
    let before = observable(&target);
    // Every bit in the release profile; every fifth in debug, where each load is slower.
    let stride = if cfg!(debug_assertions) { 5 } else { 1 };
    let mut loaded = Vec::new();
    for bit in (0..header_len * 8).step_by(stride) {
        let mut bytes = good.clone();
        bytes[bit / 8] ^= 1 << (bit % 8);
        std::fs::write(&path, &bytes).unwrap();
        if target.load_checkpoint(&path).is_ok() {
            loaded.push(bit);
            target = optimizer();
            run(&mut target, 1, 2.0);
        }
    }
    assert!(
        loaded.is_empty(),
        "header bit flips that loaded: {loaded:?}"
    );
    assert_eq!(observable(&target), before);
    // And a sample of flips in the tensor data.
    for byte in (header_len..good.len()).step_by(7) {
        let mut bytes = good.clone();
        bytes[byte] ^= 0x04;
        std::fs::write(&path, &bytes).unwrap();
        refused(&mut target, &path, &format!("data byte {byte} flipped"));
    }
}

/// The checksum as the checkpoint module documents it, written independently: CRC-32 over framed
/// items (u64 little-endian length, then the bytes): the format, the header, then each tensor's
/// name and data in name order.
fn seal(format: &str, header: &str, tensors: &[(String, Dtype, Vec<usize>, Vec<u8>)]) -> String {
    let mut h = crc32fast::Hasher::new();
    let mut item = |b: &[u8]| {
        h.update(&(b.len() as u64).to_le_bytes());
        h.update(b);
    };
    item(format.as_bytes());
    item(header.as_bytes());
    let mut sorted: Vec<_> = tensors.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(&b.0));
    for (name, _, _, data) in sorted {
        item(name.as_bytes());
        item(data);
    }
    format!("{:08x}", h.finalize())
}

/// A checkpoint with its header edited by `edit` and sealed again with a valid checksum.
fn resealed(good: &[u8], edit: impl FnOnce(&mut Value)) -> Vec<u8> {
    let file = SafeTensors::deserialize(good).unwrap();
    let (_, meta) = SafeTensors::read_metadata(good).unwrap();
    let meta = meta.metadata().clone().unwrap();
    let mut header: Value = serde_json::from_str(&meta["header"]).unwrap();
    edit(&mut header);
    let header = serde_json::to_string(&header).unwrap();
    let tensors: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(n, v)| (n, v.dtype(), v.shape().to_vec(), v.data().to_vec()))
        .collect();
    let metadata = HashMap::from([
        ("format".to_string(), FORMAT.to_string()),
        ("crc32".to_string(), seal(FORMAT, &header, &tensors)),
        ("header".to_string(), header),
    ]);
    let views: Vec<(String, TensorView)> = tensors
        .iter()
        .map(|(n, d, s, b)| (n.clone(), TensorView::new(*d, s.clone(), b).unwrap()))
        .collect();
    safetensors::serialize(views, &Some(metadata)).unwrap()
}

#[test]
fn headers_edited_and_resealed_are_validated_like_constructor_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let (path, good) = saved(dir.path());
    // The oracle seals like the library: an unedited reseal loads.
    std::fs::write(&path, resealed(&good, |_| {})).unwrap();
    let mut target = optimizer();
    target.load_checkpoint(&path).unwrap();

    type Edit = Box<dyn Fn(&mut Value)>;
    let edits: Vec<(&str, Edit)> = vec![
        (
            "negative lr",
            Box::new(|h| h["optimizer"]["lr"] = (-1.0).into()),
        ),
        (
            "lr 1e300",
            Box::new(|h| h["optimizer"]["lr"] = 1e300.into()),
        ),
        (
            "step u64::MAX",
            Box::new(|h| h["optimizer"]["step"] = u64::MAX.into()),
        ),
        (
            "step 2^60",
            Box::new(|h| h["optimizer"]["step"] = (1u64 << 60).into()),
        ),
        (
            "loss scale 0",
            Box::new(|h| h["optimizer"]["loss_scale"] = 0.0.into()),
        ),
        (
            "loss scale -8",
            Box::new(|h| h["optimizer"]["loss_scale"] = (-8.0).into()),
        ),
        (
            "loss scale 1e300",
            Box::new(|h| h["optimizer"]["loss_scale"] = 1e300.into()),
        ),
        (
            "good steps past the growth interval",
            Box::new(|h| h["optimizer"]["good_steps"] = 1_000_000.into()),
        ),
        (
            "beta1 2",
            Box::new(|h| h["optimizer"]["rule"]["beta1"] = 2.0.into()),
        ),
        (
            "clip max_norm -1",
            Box::new(|h| h["optimizer"]["options"]["clip"]["max_norm"] = (-1.0).into()),
        ),
        (
            "dynamic growth 0.5",
            Box::new(|h| {
                h["optimizer"]["options"]["loss_scale"]["Dynamic"]["growth_factor"] = 0.5.into()
            }),
        ),
        (
            "group lr_scale -1",
            Box::new(|h| h["groups"][0][1]["lr_scale"] = (-1.0).into()),
        ),
        (
            "group weight decay -1",
            Box::new(|h| h["groups"][1][1]["weight_decay"] = (-1.0).into()),
        ),
        (
            "groups renamed",
            Box::new(|h| h["groups"][1][0] = "other".into()),
        ),
        (
            "step scalars of a later step",
            Box::new(|h| h["optimizer"]["memo"]["t"] = 100.into()),
        ),
        (
            "a negative weight sum",
            Box::new(|h| h["optimizer"]["memo"]["weight_sum"] = (-1.0).into()),
        ),
    ];
    let mut target = optimizer();
    run(&mut target, 1, 3.0);
    for (what, edit) in edits {
        std::fs::write(&path, resealed(&good, edit)).unwrap();
        refused(&mut target, &path, what);
    }
}

/// A step count past 2^31 (and past 2^32) is an ordinary value: the bias corrections are 1 to
/// working precision, so both give the same step, with no overflow or wrap anywhere.
#[test]
fn large_step_counts_load_and_step_correctly() {
    let dir = tempfile::tempdir().unwrap();
    let (path, good) = saved(dir.path());
    let mut outcomes = Vec::new();
    for step in [1u64 << 31, (1 << 32) + 5] {
        std::fs::write(
            &path,
            resealed(&good, |h| h["optimizer"]["step"] = step.into()),
        )
        .unwrap();
        let mut opt = optimizer();
        opt.load_checkpoint(&path).unwrap();
        assert_eq!(opt.step_count().unwrap(), step);
        run(&mut opt, 1, 4.0);
        assert_eq!(opt.step_count().unwrap(), step + 1);
        let w = opt.params().read_param("w").unwrap();
        assert!(w.iter().all(|x| x.is_finite()), "{w:?}");
        outcomes.push(w);
    }
    assert_eq!(outcomes[0], outcomes[1]);
}

#[test]
fn concurrent_saves_to_one_path_all_succeed_and_leave_one_whole_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("shared.safetensors");
    let steps_saved: Vec<u64> = std::thread::scope(|s| {
        let handles: Vec<_> = (0..4)
            .map(|i| {
                let path = &path;
                s.spawn(move || {
                    let mut opt = optimizer();
                    run(&mut opt, i + 1, 1.0);
                    for _ in 0..8 {
                        opt.save_checkpoint(path).unwrap();
                    }
                    opt.step_count().unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut opt = optimizer();
    opt.load_checkpoint(&path).unwrap();
    assert!(steps_saved.contains(&opt.step_count().unwrap()));
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert_eq!(left.len(), 1, "temp files left behind: {left:?}");
}

#[cfg(unix)]
#[test]
fn planted_links_are_never_followed() {
    let dir = tempfile::tempdir().unwrap();
    let victim = dir.path().join("victim");
    std::fs::write(&victim, b"precious").unwrap();
    let path = dir.path().join("opt.safetensors");
    // Links at every name a save might have used, and at the target itself.
    for name in [
        format!(".opt.safetensors.tmp-{}", std::process::id()),
        format!(".opt.safetensors.{}.fusedopt-tmp", std::process::id()),
    ] {
        std::os::unix::fs::symlink(&victim, dir.path().join(name)).unwrap();
    }
    std::os::unix::fs::symlink(&victim, &path).unwrap();
    let mut opt = optimizer();
    run(&mut opt, 2, 1.0);
    opt.save_checkpoint(&path).unwrap();
    assert_eq!(std::fs::read(&victim).unwrap(), b"precious");
    assert!(std::fs::symlink_metadata(&path).unwrap().is_file());
    let mut back = optimizer();
    back.load_checkpoint(&path).unwrap();
    assert_eq!(observable(&back), observable(&opt));
}

const SAVER: &str = "FUSEDOPT_HOSTILE_SAVER";

/// This machine's name as checkpoint temp files carry it (the checkpoint module's docs).
#[cfg(target_os = "linux")]
fn host() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap()
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Run as a child process by the test below: saves a large optimizer to the given path forever.
#[test]
#[ignore = "a helper process for temp_files_of_killed_saves_are_removed_by_the_next_save"]
fn saver_process() {
    let Ok(path) = std::env::var(SAVER) else {
        return;
    };
    let n = 1 << 22;
    let mut b = ParamSet::builder();
    b.add("w", &[n], &vec![0.5; n]).unwrap();
    let opt = Optimizer::new(
        b.build(Device::Cpu).unwrap(),
        Adam::preset(Flavor::PyTorch),
        1e-3,
    )
    .unwrap();
    loop {
        opt.save_checkpoint(&path).unwrap();
    }
}

#[cfg(target_os = "linux")]
#[test]
fn temp_files_of_killed_saves_are_removed_by_the_next_save() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.safetensors");
    let temps = || -> Vec<String> {
        std::fs::read_dir(dir.path())
            .unwrap()
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| n != "big.safetensors")
            .collect()
    };
    for _ in 0..3 {
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args(["--exact", "saver_process", "--ignored", "--nocapture"])
            .env(SAVER, &path)
            .stdout(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        while temps().is_empty() {
            assert!(Instant::now() < deadline, "the saver never started a save");
            std::thread::sleep(Duration::from_millis(1));
        }
        child.kill().unwrap(); // SIGKILL: no destructor runs
        child.wait().unwrap();
    }
    assert!(
        !temps().is_empty(),
        "the killed saves left no temp file to clean"
    );
    // Temps that are not this machine's, or not this target's, are never touched.
    let mut foreign = vec![
        ".big.safetensors.AbCdEf.elsewhere.1.fusedopt-tmp".to_string(),
        format!(".big.safetensors.1.AbCdEf.{}.1.fusedopt-tmp", host()),
    ];
    for f in &foreign {
        std::fs::write(dir.path().join(f), b"not ours").unwrap();
    }
    let mut opt = optimizer();
    run(&mut opt, 1, 1.0);
    opt.save_checkpoint(dir.path().join("big.safetensors"))
        .unwrap();
    let mut left = temps();
    left.sort();
    foreign.sort();
    assert_eq!(
        left, foreign,
        "stale temp files survived a save, or foreign ones did not"
    );
}

#[cfg(unix)]
#[test]
fn loading_a_fifo_or_a_directory_fails_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let fifo = dir.path().join("fifo");
    let made = std::process::Command::new("mkfifo").arg(&fifo).status();
    assert!(made.is_ok_and(|s| s.success()), "mkfifo failed");
    for path in [fifo, dir.path().to_path_buf()] {
        let (tx, rx) = std::sync::mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let mut opt = optimizer();
            let r = opt.load_checkpoint(&p).map_err(|e| e.to_string());
            let _ = tx.send(r);
        });
        let r = rx
            .recv_timeout(Duration::from_secs(5))
            .unwrap_or_else(|_| panic!("loading {} hung", path.display()));
        assert!(r.is_err(), "{} loaded", path.display());
    }
}

/// Tensor names so long that the header passes safetensors' 100 MB limit: the save refuses (a
/// file that could never load is worse than an error), and leaves nothing behind.
#[test]
fn a_checkpoint_that_could_never_load_is_not_written() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("long.safetensors");
    let long = |c: char| c.to_string().repeat(55_000_000);
    let (a, b) = (long('a'), long('b'));
    let opt = Optimizer::new(params([&a, &b]), Sgd::preset(Flavor::PyTorch), 1e-3).unwrap();
    let err = opt.save_checkpoint(&path).unwrap_err();
    assert!(err.to_string().contains("header"), "{err}");
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn a_load_into_a_differently_configured_optimizer_is_refused_and_names_the_difference() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = saved(dir.path());
    let differing: Vec<(&str, Optimizer)> = vec![
        (
            "clip",
            Optimizer::with_options(
                params(["w", "b"]),
                Adam::adamw(Flavor::PyTorch),
                1e-3,
                OptimizerOptions {
                    clip: None,
                    ..options()
                },
            )
            .unwrap(),
        ),
        (
            "loss_scale",
            Optimizer::with_options(
                params(["w", "b"]),
                Adam::adamw(Flavor::PyTorch),
                1e-3,
                OptimizerOptions {
                    loss_scale: LossScale::None,
                    ..options()
                },
            )
            .unwrap(),
        ),
        (
            "beta2",
            Optimizer::with_options(
                params(["w", "b"]),
                Adam {
                    beta2: 0.99,
                    ..Adam::adamw(Flavor::PyTorch)
                },
                1e-3,
                options(),
            )
            .unwrap(),
        ),
        ("weight_decay", {
            let mut b = ParamSet::builder();
            b.group("no_decay", GroupOptions::default()).unwrap();
            b.add("w", &[2, 3], &[0.0; 6]).unwrap();
            b.add_to("no_decay", "b", &[3], &[0.0; 3]).unwrap();
            Optimizer::with_options(
                b.build(Device::Cpu).unwrap(),
                Adam::adamw(Flavor::PyTorch),
                1e-3,
                options(),
            )
            .unwrap()
        }),
    ];
    for (field, mut opt) in differing {
        let before = observable(&opt);
        let err = opt.load_checkpoint(&path).unwrap_err();
        assert!(
            matches!(err, Error::BadCheckpoint { .. }) && err.to_string().contains(field),
            "{field}: {err}"
        );
        assert_eq!(observable(&opt), before, "{field}");
    }
}

#[test]
fn the_schedule_position_is_saved_and_restored() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sched.safetensors");
    let keras_decay = || {
        Box::new(Counted::new(keras::Schedule::ExponentialDecay {
            initial_learning_rate: 0.1,
            decay_steps: 2.0,
            decay_rate: 0.5,
            staircase: false,
        }))
    };
    let torch_cosine = || {
        Box::new(
            torch::Scheduler::new(
                torch::Kind::CosineAnnealingLR {
                    t_max: 7,
                    eta_min: 0.001,
                },
                0.1,
            )
            .unwrap(),
        )
    };
    for torch_style in [false, true] {
        let attach = |opt: &mut Optimizer| {
            if torch_style {
                opt.set_schedule(Some(torch_cosine())).unwrap()
            } else {
                opt.set_schedule(Some(keras_decay())).unwrap()
            }
        };
        let mut whole = optimizer();
        attach(&mut whole);
        run(&mut whole, 8, 1.0);

        let mut first = optimizer();
        attach(&mut first);
        run(&mut first, 5, 1.0);
        first.save_checkpoint(&path).unwrap();
        let mut resumed = optimizer();
        attach(&mut resumed);
        resumed.load_checkpoint(&path).unwrap();
        // The same three steps as the uninterrupted run's last three (same gradients).
        for s in 5..8 {
            let g = |n: usize| -> Vec<f32> {
                (0..n)
                    .map(|i| ((i as f32 + 1.0) * (s as f32 + 1.0)).sin())
                    .collect()
            };
            resumed.params_mut().set_grad("w", &g(6)).unwrap();
            resumed.params_mut().set_grad("b", &g(3)).unwrap();
            resumed.step().unwrap();
        }
        assert_eq!(
            observable(&resumed),
            observable(&whole),
            "torch_style={torch_style}"
        );

        // Without the schedule, or with another one, the load is refused.
        let mut bare = optimizer();
        refused(
            &mut bare,
            &path,
            "checkpoint with a schedule into one without",
        );
        let mut other = optimizer();
        if torch_style {
            other.set_schedule(Some(keras_decay())).unwrap();
        } else {
            other.set_schedule(Some(torch_cosine())).unwrap();
        }
        refused(&mut other, &path, "checkpoint into another schedule");
    }
}

/// At the step-count limit a step that would apply is refused and changes nothing, while one that
/// skips (non-finite gradients) still skips as the policy says.
#[test]
fn the_step_count_limit_refuses_only_steps_that_would_apply() {
    let dir = tempfile::tempdir().unwrap();
    let (path, good) = saved(dir.path());
    let limit = fusedopt::MAX_STEP;
    std::fs::write(
        &path,
        resealed(&good, |h| h["optimizer"]["step"] = limit.into()),
    )
    .unwrap();
    let mut opt = optimizer();
    opt.load_checkpoint(&path).unwrap();
    let before = observable(&opt);
    opt.params_mut().set_grad("w", &[f32::NAN; 6]).unwrap();
    opt.step().unwrap();
    assert!(opt.report().unwrap().skipped);
    opt.params_mut().set_grad("w", &[0.1; 6]).unwrap();
    let err = opt.step().unwrap_err();
    assert!(matches!(err, Error::InvalidHyperparameter(_)), "{err}");
    // Only the dynamic loss scale moved (the skip backed it off), as a skip does.
    let after = observable(&opt);
    assert_eq!(after[0], before[0]);
    assert_eq!(after[3..], before[3..]);
}

/// Schedule-free's averaging weights depend on every earlier step's lr: the checkpoint carries
/// them, a resumed run continues bit for bit, and running weights that do not belong to the saved
/// step are refused.
#[test]
fn schedule_free_checkpoints_carry_the_running_weights() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("sf.safetensors");
    for rule in [
        ScheduleFree::adamw(Flavor::PyTorch),
        ScheduleFree::sgd(Flavor::Optax),
    ] {
        let rule = ScheduleFree {
            warmup_steps: 2,
            ..rule
        };
        let new =
            || Optimizer::with_options(params(["w", "b"]), rule.clone(), 1e-3, options()).unwrap();
        let mut a = new();
        for (k, lr) in [1e-2, 3e-2, 5e-3].into_iter().enumerate() {
            a.set_lr(lr).unwrap();
            run(&mut a, 1, k as f32);
        }
        a.save_checkpoint(&path).unwrap();
        let good = std::fs::read(&path).unwrap();
        let mut b = new();
        b.load_checkpoint(&path).unwrap();
        assert_eq!(observable(&a), observable(&b));
        run(&mut a, 2, 7.0);
        run(&mut b, 2, 7.0);
        assert_eq!(
            observable(&a),
            observable(&b),
            "{rule:?}: resumed run differs"
        );
        assert_eq!(a.eval_param("w").unwrap(), b.eval_param("w").unwrap());

        let mut fresh = new();
        for (what, edit) in [
            ("weights of an earlier step", ("t", 2.into())),
            ("another weight sum", ("weight_sum", Value::from(0.0))),
        ] {
            std::fs::write(
                &path,
                resealed(&good, |h| h["optimizer"]["memo"][edit.0] = edit.1.clone()),
            )
            .unwrap();
            if what == "another weight sum" {
                // A weight sum is a value, not a contradiction: it loads and is used.
                fresh.load_checkpoint(&path).unwrap();
                continue;
            }
            refused(&mut fresh, &path, what);
        }
    }
}
