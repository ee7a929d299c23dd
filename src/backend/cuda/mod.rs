//! The CUDA backend (ARCHITECTURE.md §4): one device, one stream, the kernels of `kernels/` loaded as
//! PTX, and cuBLASLt for GEMMs.
//!
//! Everything goes through cudarc with `dynamic-loading`: the build needs no CUDA, and
//! `libcuda.so` / `libcublasLt.so` are opened on first use. A bare context creation panics where
//! there is no driver, so [`Gpu::open`] first asks `is_culib_present()` and then runs the probe
//! under `catch_unwind` (a driver too old for the CUDA 13.0 symbol set also panics inside cudarc);
//! either way the caller gets a reason and falls back to the CPU.
//!
//! The op families mirror the kernel files: [`mincos`] (`mincos_topk.cu`), [`fusion`]
//! (`fusion_attn.cu`), [`edpo`] (`edpo_loss.cu`), [`qgemm`] (`qgemm.cu`), [`gemm`] (cuBLASLt). Each takes device buffers;
//! the parity tests and `sage bench kernels` upload host data with [`Gpu::upload`].

pub mod dwconv;
pub mod edpo;
pub mod fusion;
pub mod gemm;
pub mod head;
pub mod kernels;
pub mod llm;
pub mod llm_attn;
pub mod llm_decode;
pub mod mincos;
pub mod qgemm;
pub mod step_ops;

use crate::backend::nvrtc::Arch;
use anyhow::{anyhow, bail, Context, Result};
use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, DeviceRepr, ValidAsZeroBits};
use serde::Serialize;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

/// What `sage doctor` and the benchmark reports say about the device.
#[derive(Clone, Debug, Serialize)]
pub struct DeviceInfo {
    pub ordinal: usize,
    pub name: String,
    pub compute_capability: (i32, i32),
    /// The architecture the kernels are compiled for (PTX, JIT-compiled by the driver).
    pub arch: u32,
    pub total_memory_bytes: usize,
    pub sm_count: usize,
    /// `cuDriverGetVersion`, e.g. 13000 for CUDA 13.0.
    pub driver_version: i32,
}

/// Kernel modules by file, and their functions by (file, entry point).
#[derive(Default)]
struct Loaded {
    modules: HashMap<&'static str, Arc<CudaModule>>,
    functions: HashMap<(&'static str, String), CudaFunction>,
}

/// One device with its stream, loaded kernel modules and (lazily) a cuBLASLt handle.
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    info: DeviceInfo,
    loaded: Mutex<Loaded>,
    blas: OnceLock<std::result::Result<gemm::Blas, String>>,
    /// Bytes allocated through [`Gpu::zeros`] and [`Gpu::upload`] so far (never decremented): the
    /// difference around an op bounds its peak device memory from above.
    allocated: AtomicUsize,
}

impl std::fmt::Debug for Gpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gpu").field("info", &self.info).finish()
    }
}

/// The architecture whose PTX runs on a device of compute capability `cc`: the kernels need bf16
/// `mma.sync` (sm_80+); Hopper and newer get the compute_90 PTX.
pub fn arch_for(cc: (i32, i32)) -> Result<Arch> {
    match cc.0 {
        m if m >= 9 => Ok(Arch::SM90),
        8 => Ok(Arch::SM80),
        _ => bail!(
            "compute capability {}.{} is below 8.0: the kernels use bf16 tensor-core instructions (sm_80+)",
            cc.0,
            cc.1
        ),
    }
}

impl Gpu {
    /// Opens device `ordinal`, or says why not. Never panics.
    pub fn open(ordinal: usize) -> Result<Arc<Gpu>> {
        // SAFETY: dlopen of the driver library by name; nothing is called in it yet.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            bail!("no CUDA driver (libcuda.so) could be loaded on this machine");
        }
        let probe = std::panic::catch_unwind(|| -> Result<Arc<Gpu>> {
            let ctx =
                CudaContext::new(ordinal).map_err(|e| anyhow!("creating a CUDA context on device {ordinal}: {e}"))?;
            let cc = ctx.compute_capability().map_err(|e| anyhow!("reading the compute capability: {e}"))?;
            let arch = arch_for(cc)?;
            let mut driver_version = 0;
            // SAFETY: writes one int.
            unsafe { cudarc::driver::sys::cuDriverGetVersion(&mut driver_version) }
                .result()
                .map_err(|e| anyhow!("cuDriverGetVersion: {e}"))?;
            let info = DeviceInfo {
                ordinal,
                name: ctx.name().unwrap_or_else(|_| "unknown device".into()),
                compute_capability: cc,
                arch: arch.0,
                total_memory_bytes: ctx.total_mem().unwrap_or(0),
                sm_count: ctx
                    .attribute(cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
                    .unwrap_or(1)
                    .max(1) as usize,
                driver_version,
            };
            // One stream, used in order: cudarc's per-buffer event tracking only adds work.
            // SAFETY: every buffer of this context is used on `stream` alone.
            unsafe { ctx.disable_event_tracking() };
            let stream = ctx.default_stream();
            Ok(Arc::new(Gpu {
                ctx,
                stream,
                info,
                loaded: Mutex::new(Loaded::default()),
                blas: OnceLock::new(),
                allocated: AtomicUsize::new(0),
            }))
        });
        match probe {
            Ok(r) => r,
            Err(p) => {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                bail!("the CUDA driver could not be used (is it older than CUDA 13.0?): {msg}")
            }
        }
    }

    /// Device 0 for the whole process, opened once; the error is remembered.
    pub fn global() -> Result<Arc<Gpu>> {
        static GPU: OnceLock<std::result::Result<Arc<Gpu>, String>> = OnceLock::new();
        GPU.get_or_init(|| Gpu::open(0).map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow!("{e}"))
    }

    pub fn info(&self) -> &DeviceInfo {
        &self.info
    }

    pub fn arch(&self) -> Arch {
        Arch(self.info.arch)
    }

    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Entry point `name` of kernel file `file`: the module is compiled (or read from the PTX
    /// cache) and loaded on first use, and each function looked up once, so a launch costs no
    /// driver lookup.
    pub fn function(&self, file: &'static kernels::KernelFile, name: &str) -> Result<CudaFunction> {
        let mut loaded = self.loaded.lock().map_err(|_| anyhow!("kernel table poisoned"))?;
        if let Some(f) = loaded.functions.get(&(file.name, name.to_string())) {
            return Ok(f.clone());
        }
        let module = match loaded.modules.get(file.name) {
            Some(m) => m.clone(),
            None => {
                let ptx = kernels::ptx(file, self.arch())?;
                let m = self
                    .ctx
                    .load_module(cudarc::nvrtc::Ptx::from_src(ptx))
                    .map_err(|e| anyhow!("the driver could not load the PTX of kernels/{}: {e}", file.name))?;
                loaded.modules.insert(file.name, m.clone());
                m
            }
        };
        let f =
            module.load_function(name).map_err(|e| anyhow!("kernels/{} has no entry point {name}: {e}", file.name))?;
        loaded.functions.insert((file.name, name.to_string()), f.clone());
        Ok(f)
    }

    /// The cuBLASLt handle (created on first use).
    pub fn blas(&self) -> Result<&gemm::Blas> {
        self.blas
            .get_or_init(|| gemm::Blas::new(&self.stream).map_err(|e| format!("{e:#}")))
            .as_ref()
            .map_err(|e| anyhow!("{e}"))
    }

    /// Copies `host` to a new device buffer.
    pub fn upload<T: DeviceRepr>(&self, host: &[T]) -> Result<CudaSlice<T>> {
        self.allocated.fetch_add(std::mem::size_of_val(host), Ordering::Relaxed);
        self.stream.clone_htod(host).map_err(|e| anyhow!("copying {} elements to the GPU: {e}", host.len()))
    }

    /// Copies a device buffer back (waits for the stream).
    pub fn download<T: DeviceRepr + Default + Clone>(&self, dev: &CudaSlice<T>) -> Result<Vec<T>> {
        self.stream.clone_dtoh(dev).map_err(|e| anyhow!("copying {} elements from the GPU: {e}", dev.len()))
    }

    /// A zeroed device buffer of `n` elements.
    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.allocated.fetch_add(n.max(1) * std::mem::size_of::<T>(), Ordering::Relaxed);
        self.stream.alloc_zeros(n.max(1)).map_err(|e| anyhow!("allocating {n} elements on the GPU: {e}"))
    }

    /// Total bytes allocated through this handle so far (see the field).
    pub fn allocated_bytes(&self) -> usize {
        self.allocated.load(Ordering::Relaxed)
    }

    /// A device buffer of `n` elements with unspecified contents, for outputs a kernel overwrites
    /// in full (saves the memset of [`Gpu::zeros`]).
    ///
    /// # Safety
    /// Every element must be written before it is read.
    pub unsafe fn uninit<T: DeviceRepr>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.allocated.fetch_add(n.max(1) * std::mem::size_of::<T>(), Ordering::Relaxed);
        self.stream.alloc(n.max(1)).map_err(|e| anyhow!("allocating {n} elements on the GPU: {e}"))
    }

    /// The device's default memory pool, which cudarc's stream-ordered allocations draw from;
    /// `None` where the device has no stream-ordered allocator.
    fn default_pool(&self) -> Option<cudarc::driver::sys::CUmemoryPool> {
        use cudarc::driver::sys;
        if !self.ctx.has_async_alloc() || self.ctx.bind_to_thread().is_err() {
            return None;
        }
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        // SAFETY: the context is current; the driver writes one pool handle.
        let r = unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, self.ctx.cu_device()) };
        (r == sys::CUresult::CUDA_SUCCESS && !pool.is_null()).then_some(pool)
    }

    /// Peak device memory in use through the allocator since [`Gpu::reset_peak_memory`]
    /// (`CU_MEMPOOL_ATTR_USED_MEM_HIGH`): the training benchmark's peak memory.
    pub fn peak_memory_bytes(&self) -> Option<u64> {
        use cudarc::driver::sys;
        let pool = self.default_pool()?;
        let mut v: u64 = 0;
        // SAFETY: USED_MEM_HIGH is a cuuint64_t attribute.
        let r = unsafe {
            sys::cuMemPoolGetAttribute(
                pool,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                (&mut v as *mut u64).cast(),
            )
        };
        (r == sys::CUresult::CUDA_SUCCESS).then_some(v)
    }

    /// Restarts [`Gpu::peak_memory_bytes`] from the memory in use now.
    pub fn reset_peak_memory(&self) {
        use cudarc::driver::sys;
        if let Some(pool) = self.default_pool() {
            let mut zero: u64 = 0;
            // SAFETY: as above; setting the high-water mark to 0 resets it.
            unsafe {
                sys::cuMemPoolSetAttribute(
                    pool,
                    sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_USED_MEM_HIGH,
                    (&mut zero as *mut u64).cast(),
                )
            };
        }
    }

    /// Waits for all queued work; surfaces asynchronous kernel errors.
    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| anyhow!("a GPU kernel failed: {e}"))
    }

    /// (free, total) device memory in bytes.
    pub fn memory(&self) -> Result<(usize, usize)> {
        self.ctx.mem_get_info().map_err(|e| anyhow!("cuMemGetInfo: {e}"))
    }

    /// Median milliseconds of `f` over `repeats` runs after `warmup` runs, timed with CUDA events
    /// on the stream (so host overhead between launches counts, as it does in a real step).
    pub fn time_ms(&self, warmup: usize, repeats: usize, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
        for _ in 0..warmup {
            f()?;
        }
        self.sync()?;
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT);
        let mut times = Vec::with_capacity(repeats);
        for _ in 0..repeats.max(1) {
            let start = self.stream.record_event(flags).context("recording a CUDA event")?;
            f()?;
            let end = self.stream.record_event(flags).context("recording a CUDA event")?;
            end.synchronize().map_err(|e| anyhow!("a GPU kernel failed: {e}"))?;
            times.push(start.elapsed_ms(&end).context("reading a CUDA event")? as f64);
        }
        Ok(crate::util::median(&times))
    }
}

/// Why CUDA is or is not usable here, for `sage doctor` and `--device auto`.
pub fn probe() -> std::result::Result<DeviceInfo, String> {
    Gpu::global().map(|g| g.info().clone()).map_err(|e| format!("{e:#}"))
}

/// Grid/block/shared-memory for one launch.
pub(crate) fn cfg(grid: (u32, u32, u32), block: u32, shared: u32) -> cudarc::driver::LaunchConfig {
    cudarc::driver::LaunchConfig { grid_dim: grid, block_dim: (block, 1, 1), shared_mem_bytes: shared }
}

/// `usize` → `i32` kernel argument, or an error naming the size.
pub(crate) fn int(what: &str, n: usize) -> Result<i32> {
    i32::try_from(n).map_err(|_| anyhow!("{what} = {n} does not fit the kernels' 32-bit index arguments"))
}

/// `ceil(n / d)` as a grid dimension.
pub(crate) fn blocks(n: usize, d: usize) -> Result<u32> {
    u32::try_from(n.div_ceil(d).max(1)).map_err(|_| anyhow!("grid of {n}/{d} blocks is too large"))
}
