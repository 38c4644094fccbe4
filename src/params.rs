//! Parameter sets: named tensors of any shape laid out in one arena, with parameter groups.
//!
//! Tensors are placed group by group, each at an offset aligned to [`ALIGN_ELEMS`] so every tensor
//! starts on a 64-byte boundary (16-byte vector loads on the GPU, whole cache lines on the CPU); a
//! tensor whose state can be quantized starts at a multiple of [`QUANTIZED_ALIGN_ELEMS`].
//! Gradients and every optimizer state buffer use the same layout, so one offset addresses a tensor in
//! all of them, and a range of the arena is a range of every buffer (all-reduce buckets rely on this).
//! Padding elements are zero and stay zero.

use std::sync::Arc;

use crate::arena::Arena;
use crate::cuda::arena::DeviceArena;
use crate::cuda::engine::{DeviceArenas, DeviceStorage};
use crate::cuda::masters::DeviceMasters;
use crate::cuda::runtime::CudaRuntime;
use crate::error::{check_len, Error, Result};
use crate::host::{HostArenas, HostStorage};
use crate::layout::tensor_alignment;
pub use crate::layout::{
    GroupInfo, GroupOptions, Layout, TensorInfo, ALIGN_ELEMS, QUANTIZED_ALIGN_ELEMS,
};
use crate::masters::{HostMasters, HostWeights, Masters};
use crate::{DType, Device, Element};

struct PendingTensor {
    name: String,
    shape: Vec<usize>,
    len: usize,
    group: usize,
    values: Vec<f32>,
}

/// Collects tensors and groups, then lays them out. Starts with one group, `"default"`, fp32
/// gradients and no model copy.
pub struct ParamSetBuilder {
    groups: Vec<(String, GroupOptions)>,
    tensors: Vec<PendingTensor>,
    grad_dtype: DType,
    model_dtype: Option<DType>,
    masters: Masters,
}

impl Default for ParamSetBuilder {
    fn default() -> Self {
        ParamSetBuilder {
            groups: vec![("default".to_string(), GroupOptions::default())],
            tensors: Vec::new(),
            grad_dtype: DType::F32,
            model_dtype: None,
            masters: Masters::F32,
        }
    }
}

impl ParamSetBuilder {
    /// The dtype the backward pass writes gradients in (f32, bf16 or f16).
    pub fn grad_dtype(&mut self, dtype: DType) -> &mut Self {
        self.grad_dtype = dtype;
        self
    }

    /// Keep a low-precision copy of the parameters (the model's weights) beside the fp32 masters,
    /// rewritten by every step in the same pass (round to nearest even).
    pub fn model_copy(&mut self, dtype: DType) -> Result<&mut Self> {
        if dtype == DType::F32 {
            return Err(Error::InvalidHyperparameter(
                "the model copy is for bf16 or f16; fp32 weights are the masters themselves".into(),
            ));
        }
        self.model_dtype = Some(dtype);
        Ok(self)
    }

    /// How the fp32 masters are kept ([`Masters`]): without fp32 masters the bf16 weights are the
    /// model copy, and no other model copy may be asked for.
    pub fn masters(&mut self, kind: Masters) -> &mut Self {
        self.masters = kind;
        self
    }

    /// Adds a parameter group; tensors join it with [`ParamSetBuilder::add_to`].
    pub fn group(&mut self, name: &str, options: GroupOptions) -> Result<&mut Self> {
        if self.groups.iter().any(|(n, _)| n == name) {
            return Err(Error::DuplicateName(name.to_string()));
        }
        options.validate(name)?;
        self.groups.push((name.to_string(), options));
        Ok(self)
    }

    /// Adds a tensor to the default group.
    pub fn add(&mut self, name: &str, shape: &[usize], values: &[f32]) -> Result<&mut Self> {
        self.add_to("default", name, shape, values)
    }

    /// Adds a tensor, row-major `values` of `shape`, to the named group.
    pub fn add_to(
        &mut self,
        group: &str,
        name: &str,
        shape: &[usize],
        values: &[f32],
    ) -> Result<&mut Self> {
        let group = self
            .groups
            .iter()
            .position(|(n, _)| n == group)
            .ok_or_else(|| Error::UnknownGroup(group.to_string()))?;
        if self.tensors.iter().any(|t| t.name == name) {
            return Err(Error::DuplicateName(name.to_string()));
        }
        let len = shape
            .iter()
            .try_fold(1usize, |acc, &d| acc.checked_mul(d))
            .filter(|&n| n <= isize::MAX as usize / 4)
            .ok_or_else(|| Error::TooLarge {
                name: name.to_string(),
                elements: shape
                    .iter()
                    .fold(1u128, |acc, &d| acc.saturating_mul(d as u128)),
            })?;
        check_len(&format!("values of '{name}'"), len, values.len())?;
        self.tensors.push(PendingTensor {
            name: name.to_string(),
            shape: shape.to_vec(),
            len,
            group,
            values: values.to_vec(),
        });
        Ok(self)
    }

    /// Lays the tensors out and copies their values into an arena on `device`.
    pub fn build(self, device: Device) -> Result<ParamSet> {
        if self.tensors.is_empty() {
            return Err(Error::EmptyParamSet);
        }
        if let (Some(weights), Some(model)) = (self.masters.weights_dtype(), self.model_dtype) {
            if weights != model {
                return Err(Error::InvalidHyperparameter(format!(
                    "masters kept as {:?} are {weights:?} weights: a {model:?} model copy cannot \
                     be kept beside them",
                    self.masters
                )));
            }
        }
        let mut tensors = Vec::with_capacity(self.tensors.len());
        let mut groups = Vec::with_capacity(self.groups.len());
        let mut offset = 0usize;
        for (g, (gname, options)) in self.groups.into_iter().enumerate() {
            let start = offset;
            for t in self.tensors.iter().filter(|t| t.group == g) {
                let too_large = |at: usize| Error::TooLarge {
                    name: t.name.clone(),
                    elements: at as u128 + t.len as u128,
                };
                offset = offset
                    .checked_next_multiple_of(tensor_alignment(t.len))
                    .ok_or_else(|| too_large(offset))?;
                tensors.push(TensorInfo {
                    name: t.name.clone(),
                    shape: t.shape.clone(),
                    dtype: DType::F32,
                    group: g,
                    offset,
                    len: t.len,
                    part_start: 0,
                    whole_len: t.len,
                });
                offset = offset
                    .checked_add(t.len.next_multiple_of(ALIGN_ELEMS))
                    .ok_or_else(|| too_large(offset))?;
            }
            groups.push(GroupInfo {
                name: gname,
                options,
                range: start..offset,
            });
        }
        let layout = Arc::new(Layout::new(tensors, groups, offset));
        device.check()?;
        let mut values: Vec<f32> = crate::arena::filled(offset, 0.0)?;
        for t in &self.tensors {
            let info = layout.tensor(&t.name)?;
            values[info.range()].copy_from_slice(&t.values);
        }
        let grads = Arena::filled(self.grad_dtype, offset, 0.0)?;
        let (masters, model) = HostMasters::new(self.masters, values, self.model_dtype)?;
        let arenas = HostArenas {
            masters,
            grads,
            model,
        };
        let storage = match device {
            Device::Cpu => Storage::Host(HostStorage {
                arenas,
                engine: None,
            }),
            Device::Cuda(ordinal) => Storage::Cuda(Box::new(upload(ordinal, &arenas)?)),
        };
        Ok(ParamSet { layout, storage })
    }
}

/// Copies host arenas to a new device allocation; on any failure nothing stays allocated.
fn upload(ordinal: usize, host: &HostArenas) -> Result<DeviceStorage> {
    let rt = CudaRuntime::shared(ordinal)?;
    let dev = rt.device;
    let masters = DeviceMasters::upload(&rt.stream, &host.masters, dev)?;
    let grads = DeviceArena::upload(&rt.stream, &host.grads, dev)?;
    let model = host
        .model
        .as_ref()
        .map(|m| DeviceArena::upload(&rt.stream, m, dev))
        .transpose()?;
    Ok(DeviceStorage {
        rt,
        arenas: DeviceArenas {
            masters,
            grads,
            model,
        },
        engine: None,
    })
}

/// Where a parameter set lives — host memory or one CUDA device, recorded here only — with its
/// optimizer's engine beside its arenas once an optimizer is built on it.
#[derive(Debug)]
pub(crate) enum Storage {
    Host(HostStorage),
    Cuda(Box<DeviceStorage>),
}

/// Parameters (fp32 masters), their gradients and the optional low-precision model copy, laid out
/// by one [`Layout`] on one device. Reading and writing by name works on every device; in-place
/// slices (`param`, `grad_mut`, …) exist for host memory only.
#[derive(Debug)]
pub struct ParamSet {
    layout: Arc<Layout>,
    storage: Storage,
}

impl ParamSet {
    pub fn builder() -> ParamSetBuilder {
        ParamSetBuilder::default()
    }

    pub fn layout(&self) -> &Arc<Layout> {
        &self.layout
    }

    pub fn device(&self) -> Device {
        match &self.storage {
            Storage::Host(_) => Device::Cpu,
            Storage::Cuda(d) => d.rt.device,
        }
    }

    pub fn grad_dtype(&self) -> DType {
        match &self.storage {
            Storage::Host(h) => h.arenas.grads.dtype(),
            Storage::Cuda(d) => d.arenas.grads.dtype(),
        }
    }

    /// How the set keeps its fp32 masters.
    pub fn masters(&self) -> Masters {
        match &self.storage {
            Storage::Host(h) => h.arenas.masters.kind(),
            Storage::Cuda(d) => d.arenas.masters.kind(),
        }
    }

    /// Bytes the weights take: the masters as stored (fp32, or the remainders) and the model
    /// copy or bf16 weights, padding included (gradients and optimizer state not counted).
    pub fn weight_bytes(&self) -> usize {
        let model = self.model_dtype().map_or(0, DType::size_bytes);
        self.layout.arena_len() * (self.masters().bytes_per_param() + model)
    }

    /// The model copy's dtype: bf16 when the set keeps no fp32 masters (the weights themselves).
    pub fn model_dtype(&self) -> Option<DType> {
        match &self.storage {
            Storage::Host(h) => h.arenas.model.as_ref().map(Arena::dtype),
            Storage::Cuda(d) => d.arenas.model.as_ref().map(DeviceArena::dtype),
        }
    }

    /// The arenas, when they live in host memory.
    fn host(&self) -> Result<&HostArenas> {
        match &self.storage {
            Storage::Host(h) => Ok(&h.arenas),
            Storage::Cuda(d) => Err(Error::NotHostMemory(d.rt.device)),
        }
    }

    fn host_mut(&mut self) -> Result<&mut HostArenas> {
        match &mut self.storage {
            Storage::Host(h) => Ok(&mut h.arenas),
            Storage::Cuda(d) => Err(Error::NotHostMemory(d.rt.device)),
        }
    }

    /// A tensor's fp32 master values, read in place (host memory and fp32 masters only; see
    /// [`ParamSet::read_param`]).
    pub fn param(&self, name: &str) -> Result<&[f32]> {
        let r = self.layout.tensor(name)?.range();
        Ok(&self.host()?.masters.as_f32()?[r])
    }

    /// A tensor's master values, for writing in place (host memory and fp32 masters only; see
    /// [`ParamSet::write_param`]). The model copy is refreshed from the masters at the next step.
    pub fn param_mut(&mut self, name: &str) -> Result<&mut [f32]> {
        let r = self.layout.tensor(name)?.range();
        Ok(&mut self.host_mut()?.masters.as_f32_mut()?[r])
    }

    /// A tensor's fp32 master values, copied out (from the device if they live there; joined
    /// from weights and remainders, or widened from the bf16 weights, when not kept in fp32).
    pub fn read_param(&self, name: &str) -> Result<Vec<f32>> {
        let r = self.layout.tensor(name)?.range();
        Ok(self.read_masters(r)?.into_owned())
    }

    /// Sets a tensor's fp32 masters, and its model copy or weights with them (any device, any
    /// [`Masters`]: split into weights and remainders, or rounded to the nearest bf16).
    pub fn write_param(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let t = self.layout.tensor(name)?;
        check_len(&format!("values of '{name}'"), t.len, values.len())?;
        self.write_masters(t.offset, values)
    }

    /// The fp32 masters of `range`: borrowed when they are fp32 in host memory, else copied out.
    fn read_masters(&self, range: std::ops::Range<usize>) -> Result<std::borrow::Cow<'_, [f32]>> {
        match &self.storage {
            Storage::Host(h) => h.arenas.masters.read(h.arenas.model.as_ref(), range),
            Storage::Cuda(d) => d
                .arenas
                .read_masters(&d.rt.stream, range, d.rt.device)
                .map(std::borrow::Cow::Owned),
        }
    }

    /// Writes fp32 masters from element `start` on, with the model copy or weights.
    pub(crate) fn write_masters(&mut self, start: usize, values: &[f32]) -> Result<()> {
        match &mut self.storage {
            Storage::Host(h) => {
                let a = &mut h.arenas;
                a.masters.write(a.model.as_mut(), start, values)
            }
            Storage::Cuda(d) => d
                .arenas
                .write_masters(&d.rt.stream, start, values, d.rt.device),
        }
    }

    /// A tensor's low-precision model copy, in place (host memory only; `T` is the copy's dtype).
    pub fn model_param<T: Element>(&self, name: &str) -> Result<&[T]> {
        let r = self.layout.tensor(name)?.range();
        let model = self.host()?.model.as_ref().ok_or_else(no_model_copy)?;
        Ok(&model.typed::<T>(name)?[r])
    }

    /// A tensor's model copy, widened to f32 and copied out (any device).
    pub fn read_model_param(&self, name: &str) -> Result<Vec<f32>> {
        let r = self.layout.tensor(name)?.range();
        match &self.storage {
            Storage::Host(h) => Ok(h.arenas.model.as_ref().ok_or_else(no_model_copy)?.to_f32(r)),
            Storage::Cuda(d) => d.arenas.model.as_ref().ok_or_else(no_model_copy)?.read(
                &d.rt.stream,
                r,
                d.rt.device,
            ),
        }
    }

    /// A tensor's gradient as stored (host memory only; `T` is the gradient dtype).
    pub fn grad<T: Element>(&self, name: &str) -> Result<&[T]> {
        let r = self.layout.tensor(name)?.range();
        Ok(&self.host()?.grads.typed::<T>(name)?[r])
    }

    /// A tensor's gradient, for the backward pass to write into (host memory only).
    pub fn grad_mut<T: Element>(&mut self, name: &str) -> Result<&mut [T]> {
        let r = self.layout.tensor(name)?.range();
        Ok(&mut self.host_mut()?.grads.typed_mut::<T>(name)?[r])
    }

    /// Copies f32 `values` into a tensor's gradient, rounding to the gradient dtype (any device).
    pub fn set_grad(&mut self, name: &str, values: &[f32]) -> Result<()> {
        let t = self.layout.tensor(name)?;
        check_len(&format!("gradient of '{name}'"), t.len, values.len())?;
        match &mut self.storage {
            Storage::Host(h) => {
                h.arenas.grads.write_f32(t.offset, values);
                Ok(())
            }
            Storage::Cuda(d) => d
                .arenas
                .grads
                .write(&d.rt.stream, t.offset, values, d.rt.device),
        }
    }

    /// A tensor's gradient widened to f32 and copied out (any device).
    pub fn read_grad(&self, name: &str) -> Result<Vec<f32>> {
        let r = self.layout.tensor(name)?.range();
        match &self.storage {
            Storage::Host(h) => Ok(h.arenas.grads.to_f32(r)),
            Storage::Cuda(d) => d.arenas.grads.read(&d.rt.stream, r, d.rt.device),
        }
    }

    pub fn zero_grads(&mut self) -> Result<()> {
        match &mut self.storage {
            Storage::Host(h) => {
                h.arenas.grads.fill(0.0);
                Ok(())
            }
            Storage::Cuda(d) => d.arenas.grads.zero(&d.rt.stream, d.rt.device),
        }
    }

    /// The whole arena of fp32 masters (padding included), in layout order (host memory only).
    pub fn masters_arena(&self) -> Result<&[f32]> {
        self.host()?.masters.as_f32()
    }

    /// The whole arena of fp32 masters (padding included), copied out: from any device, joined or
    /// widened when not kept as fp32.
    pub fn read_masters_arena(&self) -> Result<Vec<f32>> {
        Ok(self.masters_snapshot()?.into_owned())
    }

    /// The whole gradient arena (host memory only): contiguous ranges of it are all-reduce buckets.
    pub fn grads_arena(&self) -> Result<&Arena> {
        Ok(&self.host()?.grads)
    }

    pub fn grads_arena_mut(&mut self) -> Result<&mut Arena> {
        Ok(&mut self.host_mut()?.grads)
    }

    /// The masters and model arena (when on the host) and the gradient arena cut into
    /// consecutive buffers of `lens` elements, for collectives.
    pub(crate) fn grad_buffers_mut(
        &mut self,
        lens: &[usize],
    ) -> Result<(Option<HostWeights<'_>>, Vec<crate::comm::Buffer<'_>>)> {
        use crate::comm::{Buffer, HostBuffer};
        match &mut self.storage {
            Storage::Host(h) => {
                let HostArenas {
                    masters,
                    grads,
                    model,
                } = &mut h.arenas;
                check_len("gradient buffer split", grads.len(), lens.iter().sum())?;
                let pieces = HostBuffer::from(grads).split(lens);
                Ok((
                    Some((&*masters, model.as_ref())),
                    pieces.into_iter().map(Buffer::Host).collect(),
                ))
            }
            Storage::Cuda(d) => {
                let pieces = d.arenas.grads.split_buffers(&d.rt, lens)?;
                Ok((None, pieces.into_iter().map(Buffer::Device).collect()))
            }
        }
    }

    /// A copy of the set's tensors on the same device (without any optimizer's state).
    pub fn try_clone(&self) -> Result<Self> {
        let storage = match &self.storage {
            Storage::Host(h) => Storage::Host(HostStorage {
                arenas: h.arenas.clone(),
                engine: None,
            }),
            Storage::Cuda(d) => {
                let (s, dev) = (&d.rt.stream, d.rt.device);
                let a = &d.arenas;
                Storage::Cuda(Box::new(DeviceStorage {
                    rt: d.rt.clone(),
                    arenas: DeviceArenas {
                        masters: a.masters.try_clone(s, dev)?,
                        grads: a.grads.try_clone(s, dev)?,
                        model: a.model.as_ref().map(|m| m.try_clone(s, dev)).transpose()?,
                    },
                    engine: None,
                }))
            }
        };
        Ok(ParamSet {
            layout: self.layout.clone(),
            storage,
        })
    }

    /// A set of `layout` over `storage`, and back (a sharded group cuts and pads sets).
    pub(crate) fn from_parts(layout: Arc<Layout>, storage: Storage) -> Self {
        ParamSet { layout, storage }
    }

    pub(crate) fn into_parts(self) -> (Arc<Layout>, Storage) {
        (self.layout, self.storage)
    }

    pub(crate) fn storage(&self) -> &Storage {
        &self.storage
    }

    pub(crate) fn storage_mut(&mut self) -> &mut Storage {
        &mut self.storage
    }

    /// The fp32 masters of the whole arena, copied to the host when they live on a device.
    pub(crate) fn masters_snapshot(&self) -> Result<std::borrow::Cow<'_, [f32]>> {
        self.read_masters(0..self.layout.arena_len())
    }

    /// Replaces the masters (checkpoint restore) and rewrites the model copy from them.
    pub(crate) fn restore_masters(&mut self, new: &[f32]) -> Result<()> {
        self.write_masters(0, new)
    }
}

fn no_model_copy() -> Error {
    Error::InvalidHyperparameter("this parameter set keeps no model copy".into())
}

/// A parameter set's tensors, to write: gradients, parameters in place, the gradient arena. Reads
/// go through to the set ([`std::ops::Deref`]); the set itself cannot be replaced or swapped
/// through it, since it carries its optimizer's state ([`crate::Optimizer::params_mut`]):
///
/// ```compile_fail
/// # fn swap(a: &mut fusedopt::Optimizer, b: &mut fusedopt::Optimizer) {
/// std::mem::swap(&mut *a.params_mut(), &mut *b.params_mut()); // no DerefMut: refused
/// # }
/// ```
pub struct ParamsMut<'a>(&'a mut ParamSet);

impl<'a> ParamsMut<'a> {
    pub(crate) fn new(set: &'a mut ParamSet) -> Self {
        ParamsMut(set)
    }

    /// See [`ParamSet::param_mut`].
    pub fn param_mut(&mut self, name: &str) -> Result<&mut [f32]> {
        self.0.param_mut(name)
    }

    /// See [`ParamSet::write_param`].
    pub fn write_param(&mut self, name: &str, values: &[f32]) -> Result<()> {
        self.0.write_param(name, values)
    }

    /// See [`ParamSet::grad_mut`].
    pub fn grad_mut<T: Element>(&mut self, name: &str) -> Result<&mut [T]> {
        self.0.grad_mut(name)
    }

    /// See [`ParamSet::set_grad`].
    pub fn set_grad(&mut self, name: &str, values: &[f32]) -> Result<()> {
        self.0.set_grad(name, values)
    }

    /// See [`ParamSet::zero_grads`].
    pub fn zero_grads(&mut self) -> Result<()> {
        self.0.zero_grads()
    }

    /// See [`ParamSet::grads_arena_mut`].
    pub fn grads_arena_mut(&mut self) -> Result<&mut Arena> {
        self.0.grads_arena_mut()
    }
}

impl std::ops::Deref for ParamsMut<'_> {
    type Target = ParamSet;
    fn deref(&self) -> &ParamSet {
        self.0
    }
}
