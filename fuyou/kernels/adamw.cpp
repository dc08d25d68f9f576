// Fused CPU AdamW for fuyou: one pass over each element reads the fp32 master weight, the gradient
// (fp32, bf16 or fp16) and Adam's m and v, and writes the new weight, m, v and, optionally, the
// compute-precision (bf16 or fp16) copy of the new weight that the next forward needs.
//
// Built by fuyou/kernels/build.py with torch.utils.cpp_extension.load(is_python_module=False) and
// called through ctypes (which releases the GIL for the duration of the call). It includes no torch
// header, so it compiles in a few seconds; the interface is plain C.
//
// Note: [Own threads, not OpenMP]
// The kernel runs on the engine's optimizer thread while the main thread runs torch's compute. An
// OpenMP region entered from a second thread gets its own libgomp team, and once libgomp manages
// more threads than there are CPUs it stops spinning between regions ("throttled" spin count):
// torch's team then sleeps and wakes for every small op. Measured on 2 cores (GPT d=768, b1 s64,
// bf16): one block forward 1.8 -> 3.3 ms and backward 6.1 -> 9.0 ms once the optimizer thread had
// run an OpenMP kernel. So the kernel splits its work over a small pool of its own std::threads,
// which libgomp does not count.
//
// Note: [Bit-exact with torch]
// Every path (AVX-512, AVX2, scalar) does the same float operations in the same order as torch's
// CPU AdamW (fused=True, and the single-tensor path's ops, torch 2.13), so results are bit-exact with
// fused=True. The single-tensor path differs by an ulp now and then only because its Tensor.sqrt
// (MKL VML) is not correctly rounded; _mm512_sqrt_ps and std::sqrt are.
// Except in one place: torch's fused kernel updates a tensor's last numel % W elements (W its vector
// width, 8 on x86 in torch 2.13) in a scalar loop that its compiler contracts differently, so v there
// is fma(v, b2, (c2 * g) * g) (a new-user pass found widths not a multiple of 8 an ulp off).
// fuyou_adamw_tail_step computes that form; the caller (fuyou/optim/adamw.py, torch_tail_width) finds
// W and which elements are a tensor's tail, and checks the form against the torch it runs with.
//   p  = p * decay                        decay = float(1 - lr*wd)     (param.mul_)
//   m  = fma(w1, g - m, m)                w1 = float(1 - beta1) < 0.5  (exp_avg.lerp_, ATen lerp_vec)
//   v  = fma(c2 * g, g, v * b2)           c2 = float(1 - beta2)        (mul_ then addcmul_)
//   d  = sqrt(v) / bc2s + eps             bc2s = float(bc2 ** 0.5)     (sqrt, div, add_)
//   p  = p + (ns * m) / d                 ns = float(-lr / bc1)        (addcdiv_)
// with g = float(grad) * gscale. The scalars are computed in double by the Python caller exactly as
// torch computes them and rounded to float here. Since all three paths use the same operations
// (fmaf is exactly rounded everywhere), a chunked caller gets bit-identical results however it
// splits a tensor. This file must be compiled with -ffp-contract=off so that the compiler does not
// fuse the other multiplies and adds (which would change the rounding).
//
// Conversions: bf16 -> float is exact (shift); float -> bf16 rounds to nearest even, NaN -> 0x7FC0
// (as c10::BFloat16); fp16 <-> float uses F16C (round to nearest even, as c10::Half).

#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <mutex>
#include <system_error>
#include <thread>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#define FUYOU_X86 1
#include <immintrin.h>
#else
#define FUYOU_X86 0
#endif

inline void _mm_sfence_if_x86() {
#if FUYOU_X86
  _mm_sfence();
#endif
}

namespace {

enum GradType { G_F32 = 0, G_BF16 = 1, G_F16 = 2 };
enum LowpType { L_NONE = 0, L_BF16 = 1, L_F16 = 2 };
enum Isa { ISA_SCALAR = 0, ISA_AVX2 = 1, ISA_AVX512 = 2 };

#ifdef FUYOU_NO_STREAM  // for A/B measurements of the note [Non-temporal copy]
constexpr bool kStream = false;
#else
constexpr bool kStream = true;
#endif

struct Scalars {
  float decay, w1, w1m1, b2, c2, bc2s, eps, ns, gs;
  bool w_small;  // ATen's lerp: weight < 0.5 -> start + w*(end-start), else end + (w-1)*(end-start)
};

// The Python caller's double scalars rounded to float, as torch's ops round them (Note: [Bit-exact with torch]).
inline Scalars make_scalars(double decay, double w1, double beta2, double c2, double bc2_sqrt, double eps,
                            double neg_step, double grad_scale) {
  Scalars s;
  s.decay = static_cast<float>(decay);
  s.w1 = static_cast<float>(w1);
  s.w1m1 = s.w1 - 1.0f;  // ATen: weight - 1 in the op's float math
  s.w_small = std::fabs(s.w1) < 0.5f;
  s.b2 = static_cast<float>(beta2);
  s.c2 = static_cast<float>(c2);
  s.bc2s = static_cast<float>(bc2_sqrt);
  s.eps = static_cast<float>(eps);
  s.ns = static_cast<float>(neg_step);
  s.gs = static_cast<float>(grad_scale);
  return s;
}

// ---- scalar path (portable; also the tail of the SIMD paths) --------------------------------------

inline float bf16_to_f32(uint16_t h) {
  uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_bf16(float f) {
  if (std::isnan(f)) return 0x7FC0;
  uint32_t u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFFu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// IEEE half <-> float without F16C (round to nearest even), used only where F16C is absent.
inline float f16_to_f32(uint16_t h) {
  uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1Fu, man = h & 0x3FFu, u;
  if (exp == 0x1F) {
    u = sign | 0x7F800000u | (man << 13);
  } else if (exp == 0) {
    if (man == 0) {
      u = sign;
    } else {  // subnormal half -> normal float
      int e = -1;
      do { ++e; man <<= 1; } while ((man & 0x400u) == 0);
      u = sign | (static_cast<uint32_t>(127 - 15 - e) << 23) | ((man & 0x3FFu) << 13);
    }
  } else {
    u = sign | ((exp + 112u) << 23) | (man << 13);
  }
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline uint16_t f32_to_f16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  uint32_t sign = (u >> 16) & 0x8000u;
  uint32_t a = u & 0x7FFFFFFFu;
  if (a > 0x7F800000u) return static_cast<uint16_t>(sign | 0x7E00u | ((a >> 13) & 0x3FFu));  // NaN
  if (a >= 0x477FF000u) return static_cast<uint16_t>(sign | 0x7C00u);  // rounds to >= 65520: inf
  if (a < 0x38800000u) {  // result is subnormal or zero: add a magic number to round at bit 24
    float af, magic = 0.5f;
    std::memcpy(&af, &a, 4);
    af += magic;
    uint32_t r;
    std::memcpy(&r, &af, 4);
    return static_cast<uint16_t>(sign | (r - 0x3F000000u));
  }
  uint32_t r = a + 0xC8000FFFu + ((a >> 13) & 1u);  // rebias (-112 << 23) and round to nearest even
  return static_cast<uint16_t>(sign | (r >> 13));
}

template <int G>
inline float load_grad_scalar(const void* g, int64_t i) {
  if constexpr (G == G_F32) return static_cast<const float*>(g)[i];
  else if constexpr (G == G_BF16) return bf16_to_f32(static_cast<const uint16_t*>(g)[i]);
  else return f16_to_f32(static_cast<const uint16_t*>(g)[i]);
}

// The range kernels read p, m and v from ps, ms and vs: the same pointers (in place), or, with OOP, a
// second copy of the state (Note: [Out of place]), p, m and v then being only written.
// TAIL: v as torch's scalar loop computes it (Note: [Bit-exact with torch]: a tensor's last elements).
template <int G, int L, bool OOP, bool TAIL = false>
void run_scalar(float* p, const void* __restrict g, float* m, float* v, void* __restrict lowp, int64_t b,
                int64_t e, const Scalars& s, const float* ps, const float* ms, const float* vs) {
  for (int64_t i = b; i < e; ++i) {
    float gi = load_grad_scalar<G>(g, i) * s.gs;
    float pi = ps[i] * s.decay;
    float mi = ms[i];
    mi = s.w_small ? std::fma(s.w1, gi - mi, mi) : std::fma(s.w1m1, gi - mi, gi);
    float vi;
    if constexpr (TAIL) {
      vi = std::fma(vs[i], s.b2, (s.c2 * gi) * gi);
    } else {
      vi = vs[i] * s.b2;
      vi = std::fma(s.c2 * gi, gi, vi);
    }
    float d = std::sqrt(vi) / s.bc2s + s.eps;
    pi = pi + (s.ns * mi) / d;
    p[i] = pi;
    m[i] = mi;
    v[i] = vi;
    if constexpr (L == L_BF16) static_cast<uint16_t*>(lowp)[i] = f32_to_bf16(pi);
    if constexpr (L == L_F16) static_cast<uint16_t*>(lowp)[i] = f32_to_f16(pi);
  }
}

}  // namespace

#if FUYOU_X86
// ---- AVX-512 path ----------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx512f,fma,f16c")
namespace {

template <int G>
inline __m512 load_grad_512(const void* g, int64_t i) {
  if constexpr (G == G_F32) {
    return _mm512_loadu_ps(static_cast<const float*>(g) + i);
  } else {
    __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(g) + i));
    if constexpr (G == G_BF16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
    else return _mm512_cvtph_ps(h);
  }
}

// Note: [Non-temporal copy] The compute-precision copy is written and not read again by this pass
// (it goes on to the GPU or the SSD), so it is stored around the cache when aligned: that saves the
// read-for-ownership of its lines, 2 of the ~32 bytes of memory traffic per element. p, m and v are
// read first, so their lines are in cache anyway and are stored normally.
inline void store_16x16(__m256i* dst, __m256i x) {
  if (kStream && (reinterpret_cast<uintptr_t>(dst) & 31) == 0) _mm256_stream_si256(dst, x);
  else _mm256_storeu_si256(dst, x);
}

template <int L>
inline void store_lowp_512(void* l, int64_t i, __m512 x) {
  __m256i* dst = reinterpret_cast<__m256i*>(static_cast<uint16_t*>(l) + i);
  if constexpr (L == L_BF16) {
    __m512i u = _mm512_castps_si512(x);
    __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                 _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
    r = _mm512_srli_epi32(r, 16);
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_mov_epi32(r, nan, _mm512_set1_epi32(0x7FC0));
    store_16x16(dst, _mm512_cvtepi32_epi16(r));
  } else if constexpr (L == L_F16) {
    store_16x16(dst, _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

template <int G, int L, bool OOP>
void run_avx512(float* p, const void* __restrict g, float* m, float* v, void* __restrict lowp, int64_t b,
                int64_t e, const Scalars& s, const float* ps, const float* ms, const float* vs) {
  // Out of place, p, m and v are not read in this pass: stored around the cache, as the compute copy
  // is (Note: [Non-temporal copy]), which saves the read-for-ownership of their lines.
  const bool nt = OOP && kStream && ((reinterpret_cast<uintptr_t>(p + b) | reinterpret_cast<uintptr_t>(m + b) |
                                      reinterpret_cast<uintptr_t>(v + b)) & 63) == 0;
  const __m512 decay = _mm512_set1_ps(s.decay), b2 = _mm512_set1_ps(s.b2), c2 = _mm512_set1_ps(s.c2);
  const __m512 bc2s = _mm512_set1_ps(s.bc2s), eps = _mm512_set1_ps(s.eps), ns = _mm512_set1_ps(s.ns);
  const __m512 gs = _mm512_set1_ps(s.gs);
  const __m512 coeff = _mm512_set1_ps(s.w_small ? s.w1 : s.w1m1);
  int64_t i = b;
  for (; i + 16 <= e; i += 16) {
    __m512 gi = _mm512_mul_ps(load_grad_512<G>(g, i), gs);
    __m512 pi = _mm512_mul_ps(_mm512_loadu_ps(ps + i), decay);
    __m512 mi = _mm512_loadu_ps(ms + i);
    mi = _mm512_fmadd_ps(coeff, _mm512_sub_ps(gi, mi), s.w_small ? mi : gi);
    __m512 vi = _mm512_mul_ps(_mm512_loadu_ps(vs + i), b2);
    vi = _mm512_fmadd_ps(_mm512_mul_ps(c2, gi), gi, vi);
    __m512 d = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bc2s), eps);
    pi = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(ns, mi), d));
    if (nt) {
      _mm512_stream_ps(p + i, pi);
      _mm512_stream_ps(m + i, mi);
      _mm512_stream_ps(v + i, vi);
    } else {
      _mm512_storeu_ps(p + i, pi);
      _mm512_storeu_ps(m + i, mi);
      _mm512_storeu_ps(v + i, vi);
    }
    store_lowp_512<L>(lowp, i, pi);
  }
  if constexpr (L != L_NONE || OOP) _mm_sfence();  // order the streaming stores before the caller's use
  run_scalar<G, L, OOP>(p, g, m, v, lowp, i, e, s, ps, ms, vs);
}

}  // namespace
#pragma GCC pop_options

// ---- AVX2 path -------------------------------------------------------------------------------------
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace {

template <int G>
inline __m256 load_grad_256(const void* g, int64_t i) {
  if constexpr (G == G_F32) {
    return _mm256_loadu_ps(static_cast<const float*>(g) + i);
  } else {
    __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(g) + i));
    if constexpr (G == G_BF16) return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    else return _mm256_cvtph_ps(h);
  }
}

// See the note [Non-temporal copy].
inline void store_8x16(__m128i* dst, __m128i x) {
  if (kStream && (reinterpret_cast<uintptr_t>(dst) & 15) == 0) _mm_stream_si128(dst, x);
  else _mm_storeu_si128(dst, x);
}

template <int L>
inline void store_lowp_256(void* l, int64_t i, __m256 x) {
  __m128i* dst = reinterpret_cast<__m128i*>(static_cast<uint16_t*>(l) + i);
  if constexpr (L == L_BF16) {
    __m256i u = _mm256_castps_si256(x);
    __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                 _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
    r = _mm256_srli_epi32(r, 16);
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
    store_8x16(dst, _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1)));
  } else if constexpr (L == L_F16) {
    store_8x16(dst, _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

template <int G, int L, bool OOP>
void run_avx2(float* p, const void* __restrict g, float* m, float* v, void* __restrict lowp, int64_t b,
              int64_t e, const Scalars& s, const float* ps, const float* ms, const float* vs) {
  const bool nt = OOP && kStream && ((reinterpret_cast<uintptr_t>(p + b) | reinterpret_cast<uintptr_t>(m + b) |
                                      reinterpret_cast<uintptr_t>(v + b)) & 31) == 0;  // see run_avx512
  const __m256 decay = _mm256_set1_ps(s.decay), b2 = _mm256_set1_ps(s.b2), c2 = _mm256_set1_ps(s.c2);
  const __m256 bc2s = _mm256_set1_ps(s.bc2s), eps = _mm256_set1_ps(s.eps), ns = _mm256_set1_ps(s.ns);
  const __m256 gs = _mm256_set1_ps(s.gs);
  const __m256 coeff = _mm256_set1_ps(s.w_small ? s.w1 : s.w1m1);
  int64_t i = b;
  for (; i + 8 <= e; i += 8) {
    __m256 gi = _mm256_mul_ps(load_grad_256<G>(g, i), gs);
    __m256 pi = _mm256_mul_ps(_mm256_loadu_ps(ps + i), decay);
    __m256 mi = _mm256_loadu_ps(ms + i);
    mi = _mm256_fmadd_ps(coeff, _mm256_sub_ps(gi, mi), s.w_small ? mi : gi);
    __m256 vi = _mm256_mul_ps(_mm256_loadu_ps(vs + i), b2);
    vi = _mm256_fmadd_ps(_mm256_mul_ps(c2, gi), gi, vi);
    __m256 d = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2s), eps);
    pi = _mm256_add_ps(pi, _mm256_div_ps(_mm256_mul_ps(ns, mi), d));
    if (nt) {
      _mm256_stream_ps(p + i, pi);
      _mm256_stream_ps(m + i, mi);
      _mm256_stream_ps(v + i, vi);
    } else {
      _mm256_storeu_ps(p + i, pi);
      _mm256_storeu_ps(m + i, mi);
      _mm256_storeu_ps(v + i, vi);
    }
    store_lowp_256<L>(lowp, i, pi);
  }
  if constexpr (L != L_NONE || OOP) _mm_sfence();  // see the note [Non-temporal copy]
  run_scalar<G, L, OOP>(p, g, m, v, lowp, i, e, s, ps, ms, vs);
}

}  // namespace
#pragma GCC pop_options
#endif  // FUYOU_X86

// ---- the kernel's thread pool (see the note [Own threads, not OpenMP]) ---------------------------
namespace {

class Pool {
 public:
  // Runs body(block) for every block in [0, nblocks) on the caller and up to nt - 1 helpers. One
  // job at a time: a caller that finds the pool busy runs its blocks alone. The caller takes blocks
  // too and finishes whatever no helper took, so a helper that never starts (none could be created,
  // or a fork() left them behind in the parent) delays nothing.
  template <class F>
  void run(int nt, int64_t nblocks, F body) {
    std::unique_lock<std::mutex> busy(run_mu_, std::try_to_lock);
    if (!busy.owns_lock() || nt <= 1) {
      for (int64_t b = 0; b < nblocks; ++b) body(b);
      return;
    }
    int helpers = nt - 1;
    std::function<void(int64_t)> fn = body;
    {
      std::lock_guard<std::mutex> lk(mu_);
      while (static_cast<int>(threads_) < helpers) {
        try {
          std::thread(&Pool::loop, this).detach();  // lives as long as the process (never destroyed)
        } catch (const std::system_error&) {
          break;  // no more threads to be had: the caller and the helpers there are do the work
        }
        ++threads_;
      }
      if (helpers > static_cast<int>(threads_)) helpers = static_cast<int>(threads_);
      fn_ = &fn;
      nblocks_ = nblocks;
      next_.store(0);
      want_ = helpers;
      active_ = 0;
      ++gen_;
    }
    cv_.notify_all();
    work();
    std::unique_lock<std::mutex> lk(mu_);
    want_ = 0;  // helpers that have not started yet stay out
    done_cv_.wait(lk, [&] { return active_ == 0; });
    fn_ = nullptr;
  }

 private:
  void work() {
    for (int64_t b; (b = next_.fetch_add(1)) < nblocks_;) (*fn_)(b);
  }

  void loop() {
    uint64_t seen = 0;
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return gen_ != seen; });
      seen = gen_;
      if (want_ <= 0) continue;
      --want_;
      ++active_;
      lk.unlock();
      work();
      lk.lock();
      if (--active_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex run_mu_, mu_;
  std::condition_variable cv_, done_cv_;
  std::function<void(int64_t)>* fn_ = nullptr;
  std::atomic<int64_t> next_{0};
  int64_t nblocks_ = 0;
  uint64_t gen_ = 0;
  int want_ = 0, active_ = 0;
  unsigned threads_ = 0;
};

Pool& pool() {
  static Pool* p = new Pool();  // leaked on purpose: detached helpers may outlive static destructors
  return *p;
}

// body(block) for every block in [0, nblocks) on up to num_threads threads (the kernels of the int8/NF4 base).
template <class F>
void run_blocks(int num_threads, int64_t nblocks, F body) {
  int nt = num_threads < 1 ? 1 : num_threads;
  if (nt > nblocks) nt = static_cast<int>(nblocks);
  pool().run(nt, nblocks, body);
}

}  // namespace

// ---- dispatch --------------------------------------------------------------------------------------
namespace {

int best_isa() {
#if FUYOU_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f")) return ISA_AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return ISA_AVX2;
#endif
  return ISA_SCALAR;
}

// (p, g, m, v, lowp, b, e, scalars, ps, ms, vs): in place with ps, ms, vs = p, m, v.
using RangeFn = void (*)(float*, const void*, float*, float*, void*, int64_t, int64_t, const Scalars&,
                         const float*, const float*, const float*);

template <int G, int L, bool OOP>
RangeFn pick_isa(int isa) {
#if FUYOU_X86
  if (isa == ISA_AVX512) return run_avx512<G, L, OOP>;
  if (isa == ISA_AVX2) return run_avx2<G, L, OOP>;
#endif
  (void)isa;
  return run_scalar<G, L, OOP>;
}

template <int G, bool OOP>
RangeFn pick_lowp(int l, int isa) {
  if (l == L_BF16) return pick_isa<G, L_BF16, OOP>(isa);
  if (l == L_F16) return pick_isa<G, L_F16, OOP>(isa);
  return pick_isa<G, L_NONE, OOP>(isa);
}

template <bool OOP>
RangeFn pick_g(int gtype, int ltype, int isa) {
  if (gtype == G_BF16) return pick_lowp<G_BF16, OOP>(ltype, isa);
  if (gtype == G_F16) return pick_lowp<G_F16, OOP>(ltype, isa);
  return pick_lowp<G_F32, OOP>(ltype, isa);
}

RangeFn pick(int gtype, int ltype, int isa, bool oop = false) {
  return oop ? pick_g<true>(gtype, ltype, isa) : pick_g<false>(gtype, ltype, isa);
}

// Work is handed out in blocks of this many elements (256 KiB of fp32 per array): small enough that
// a thread delayed by the OS (these machines are shared, and the engine runs torch compute beside the
// optimizer) does not hold the others at the barrier, large enough that handing out costs nothing.
// A multiple of 64 keeps each block's 2-byte copy on whole cache lines.
constexpr int64_t kBlock = 65536;

// Note: [Out of place]
// A resident stage that speculates under exact clipping (fuyou/engine/engine.py, Note: [Spare copies])
// keeps two copies of its state in CPU memory: the update reads one and writes the other, which a redo
// with the clipped gradient then reads again. The fp32 kernel reads p, m and v from the source and
// stores them to the destination around the cache (no read-for-ownership): the memory traffic of the
// in-place step, and its arithmetic, hence every bit. The compressed state's kernel stays in place:
// each thread copies a sub-block of kSub elements (a few hundred KiB at most, inside a core's L2) into
// the destination and updates it there while its lines are in cache; that costs the destination's
// read-for-ownership on top (bench/adam_bench.py measures both). kSub is a multiple of 256, so the
// quantisation blocks stay whole.
constexpr int64_t kSub = 16384;

}  // namespace

extern "C" {

// Best ISA this CPU supports: 2 = AVX-512, 1 = AVX2+FMA, 0 = scalar.
int fuyou_adamw_best_isa() { return best_isa(); }

// One AdamW step over n contiguous elements; see the note at the top for the exact arithmetic.
// gtype: 0 fp32, 1 bf16, 2 fp16. ltype: 0 none, 1 bf16, 2 fp16 (lowp may be null when 0).
// isa: -1 = best available, else 0/1/2 (capped at the best available). Returns the ISA used.
// ps, ms, vs: null (in place), or the state to read, p, m and v then being only written (Note: [Out of place]).
int fuyou_adamw_step(float* p, const void* g, int gtype, float* m, float* v, void* lowp, int ltype,
                     int64_t n, double decay, double w1, double beta2, double c2, double bc2_sqrt,
                     double eps, double neg_step, double grad_scale, int num_threads, int isa,
                     const float* ps, const float* ms, const float* vs) {
  int best = best_isa();
  if (isa < 0 || isa > best) isa = best;
  const Scalars s = make_scalars(decay, w1, beta2, c2, bc2_sqrt, eps, neg_step, grad_scale);
  RangeFn fn = pick(gtype, ltype, isa, ps != nullptr);
  if (ps == nullptr) {
    ps = p;
    ms = m;
    vs = v;
  }

  auto range = [&](int64_t b, int64_t e) { fn(p, g, m, v, lowp, b, e, s, ps, ms, vs); };
  int64_t nblocks = (n + kBlock - 1) / kBlock;
  int nt = num_threads < 1 ? 1 : num_threads;
  if (nt > nblocks) nt = static_cast<int>(nblocks);
  if (nt <= 1) {
    range(0, n);
    return isa;
  }
  pool().run(nt, nblocks, [&](int64_t blk) {
    int64_t b = blk * kBlock, e = b + kBlock < n ? b + kBlock : n;
    range(b, e);
  });
  return isa;
}

// fuyou_adamw_step's arithmetic with v in the form of torch's scalar loop (Note: [Bit-exact with torch]),
// over the few elements at a tensor's end: scalar, on the calling thread. Returns 0 (the scalar ISA).
int fuyou_adamw_tail_step(float* p, const void* g, int gtype, float* m, float* v, void* lowp, int ltype,
                          int64_t n, double decay, double w1, double beta2, double c2, double bc2_sqrt,
                          double eps, double neg_step, double grad_scale, const float* ps, const float* ms,
                          const float* vs) {
  const Scalars s = make_scalars(decay, w1, beta2, c2, bc2_sqrt, eps, neg_step, grad_scale);
  if (ps == nullptr) {
    ps = p;
    ms = m;
    vs = v;
  }
  auto go = [&](auto tag_g, auto tag_l) {
    constexpr int GT = decltype(tag_g)::value, LT = decltype(tag_l)::value;
    run_scalar<GT, LT, true, true>(p, g, m, v, lowp, 0, n, s, ps, ms, vs);
  };
  using std::integral_constant;
  auto by_l = [&](auto tag_g) {
    if (ltype == L_BF16) go(tag_g, integral_constant<int, L_BF16>{});
    else if (ltype == L_F16) go(tag_g, integral_constant<int, L_F16>{});
    else go(tag_g, integral_constant<int, L_NONE>{});
  };
  if (gtype == G_BF16) by_l(integral_constant<int, G_BF16>{});
  else if (gtype == G_F16) by_l(integral_constant<int, G_F16>{});
  else by_l(integral_constant<int, G_F32>{});
  return 0;
}

}  // extern "C"

// ---- compressed state (fuyou/optim/compressed.py, Note: [Compressed state]) -----------------------
// The update of a chunk whose master is fp32 or bf16 and whose moments are fp32, bf16 or int8 codes
// with a scale per block of 256. Each block of 256 elements is decoded into fp32 arrays in L1, updated
// by the fp32 AdamW path above with bc2s folded into eps and the step (one division an element, not
// two: Note: [Compressed state], 2), and encoded back. The decode and encode loops are integer
// operations and IEEE fp32 multiplies (one division a block), which GCC vectorises; target_clones
// compiles them for AVX-512, AVX2 and the baseline, with the same results.
// Measured on Zen 4 (bench/RESULTS.md, issue 19): the integer work of the codes does not overlap the
// division and square root, it adds to them, so what made the int8 path as fast as the fp32 kernel
// was fewer operations: the folded division, packs instead of a narrowing move a vector, and the
// constants set once a run of blocks. Interleaving one block's encoding with the next block's update
// was tried and gained nothing.
namespace {

enum PType { P_F32 = 0, P_BF16 = 1 };
enum MType { M_F32 = 0, M_BF16 = 1, M_INT8 = 3 };
enum { L_F32 = 3 };
constexpr int kQ = 256;

struct QArgs {
  void* p; int ptype;
  const void* g; int gtype;
  void* m; void* v; int mtype; float* ms; float* vs;
  void* lowp; int ltype;
  int64_t n;
  uint32_t index0, key;
  const int64_t* seg_end; const float* seg_decay; int nseg;
  Scalars s;
  int isa;
};

__attribute__((target_clones("avx512f", "avx2", "default")))
void sr_bf16(const float* __restrict x, uint16_t* __restrict out, int len, uint32_t base) {
  for (int i = 0; i < len; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    uint32_t r = ((base + static_cast<uint32_t>(i)) * 0x9E3779B1u) >> 16;  // Note: [Compressed state]
    uint32_t b = ((u + r) >> 16) & 0xFFFFu;
    bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    out[i] = static_cast<uint16_t>(nan ? 0x7FC0u : b);
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void widen_bf16(const uint16_t* __restrict h, float* __restrict out, int len) {
  for (int i = 0; i < len; ++i) {
    uint32_t u = static_cast<uint32_t>(h[i]) << 16;
    std::memcpy(out + i, &u, 4);
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void narrow_bf16(const float* __restrict x, uint16_t* __restrict out, int len) {
  for (int i = 0; i < len; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    bool nan = (u & 0x7FFFFFFFu) > 0x7F800000u;
    uint32_t b = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
    out[i] = static_cast<uint16_t>(nan ? 0x7FC0u : b);
  }
}

// int8 codes are 8-bit minifloats of x = |m| / a (m: sign and 4 exponent + 3 mantissa bits, x in
// [2^-15, 1]) and of x = v / a (v: 5 exponent + 3 mantissa bits, x in [2^-31, 1], code 0 the smallest,
// never zero), rounded to nearest on the fp32 bits, a tie (1 value in 2^20) up: one multiply, one add
// and one arithmetic shift an element, the rebias folded into the add (code - bias = (bits + 2^19 -
// (bias << 20)) >> 20, signed; Note: [Compressed state], 3). Nearest-even took three operations more.
constexpr int32_t kMBias = 896;  // (127 - 15) << 3
constexpr int32_t kVBias = 768;  // (127 - 31) << 3
constexpr int32_t kMRound = 0x80000 - (kMBias << 20);
constexpr int32_t kVRound = 0x80000 - (kVBias << 20);

inline float from_bits(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

inline int32_t minifloat(float x, int32_t round) {  // x >= 0: the code - bias (round: kMRound, kVRound)
  uint32_t u;
  std::memcpy(&u, &x, 4);
  return static_cast<int32_t>(u + static_cast<uint32_t>(round)) >> 20;  // the kernels' add, read signed
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void decode_m8(const int8_t* __restrict q, float a, float* __restrict out, int len) {
  for (int i = 0; i < len; ++i) {
    int32_t k = q[i];
    uint32_t sign = static_cast<uint32_t>(k) & 0x80000000u;
    int32_t c = k < 0 ? -k : k;
    uint32_t bits = (static_cast<uint32_t>(c + kMBias) << 20) & (c == 0 ? 0u : 0xFFFFFFFFu);
    out[i] = from_bits(bits | sign) * a;  // (-x) * a == -(x * a): the sign rides on the code
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void decode_v8(const uint8_t* __restrict q, float a, float* __restrict out, int len) {
  for (int i = 0; i < len; ++i) out[i] = from_bits(static_cast<uint32_t>(q[i] + kVBias) << 20) * a;
}

// The largest |x| of a block, as the bits of a non-negative float (their integer order is the
// float order); x is finite or the result is garbage, as with any non-finite update.
__attribute__((target_clones("avx512f", "avx2", "default")))
float abs_max(const float* __restrict x, int len) {
  uint32_t mx = 0;
  for (int i = 0; i < len; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    u &= 0x7FFFFFFFu;
    mx = u > mx ? u : mx;
  }
  return from_bits(mx);
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void encode_m8(const float* __restrict x, float inv, int8_t* __restrict q, int len) {
  for (int i = 0; i < len; ++i) {
    uint32_t u;
    std::memcpy(&u, x + i, 4);
    int32_t c = minifloat(from_bits(u & 0x7FFFFFFFu) * inv, kMRound);
    c = c < 0 ? 0 : (c > 127 ? 127 : c);
    int32_t neg = -static_cast<int32_t>(u >> 31);  // 0 or -1
    q[i] = static_cast<int8_t>((c ^ neg) - neg);
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void encode_v8(const float* __restrict x, float inv, uint8_t* __restrict q, int len) {
  for (int i = 0; i < len; ++i) {
    int32_t c = minifloat(x[i] * inv, kVRound);
    q[i] = static_cast<uint8_t>(c < 0 ? 0 : (c > 255 ? 255 : c));
  }
}

int gsize(int gtype) { return gtype == G_F32 ? 4 : 2; }

// The weight decay of block [base, base + len): one value (in *decay; returns nullptr) or, where
// segments split the block, one an element in D (returned). seg: the first segment that may cover
// the block, advanced block by block.
inline const float* block_decay(const QArgs& A, int64_t base, int len, int& seg, float* D, float* decay) {
  while (seg < A.nseg && A.seg_end[seg] <= base) ++seg;
  *decay = seg < A.nseg ? A.seg_decay[seg] : A.s.decay;
  if (seg >= A.nseg || A.seg_end[seg] >= base + len) return nullptr;
  int64_t a = 0;
  for (int j = seg; j < A.nseg && a < len; ++j) {
    int64_t end = A.seg_end[j] - base;
    if (end > len) end = len;
    for (; a < end; ++a) D[a] = A.seg_decay[j];
  }
  return D;
}

// One block [base, base + len) (len <= 256; base a multiple of 256 from the chunk's start).
void qblock(const QArgs& A, int64_t base, int len) {
  alignas(64) float P[kQ], M[kQ], V[kQ];
  float* pp = A.ptype == P_F32 ? static_cast<float*>(A.p) + base : P;
  float* mp = A.mtype == M_F32 ? static_cast<float*>(A.m) + base : M;
  float* vp = A.mtype == M_F32 ? static_cast<float*>(A.v) + base : V;
  if (A.ptype == P_BF16) widen_bf16(static_cast<const uint16_t*>(A.p) + base, P, len);
  if (A.mtype == M_BF16) {
    widen_bf16(static_cast<const uint16_t*>(A.m) + base, M, len);
    widen_bf16(static_cast<const uint16_t*>(A.v) + base, V, len);
  } else if (A.mtype == M_INT8) {
    decode_m8(static_cast<const int8_t*>(A.m) + base, A.ms[base / kQ], M, len);
    decode_v8(static_cast<const uint8_t*>(A.v) + base, A.vs[base / kQ], V, len);
  }
  // the fp32 update, per weight-decay segment; an fp32 master writes a bf16/fp16 copy in the same pass
  int fn_l = (A.ptype == P_F32 && (A.ltype == L_BF16 || A.ltype == L_F16)) ? A.ltype : L_NONE;
  RangeFn fn = pick(A.gtype, fn_l, A.isa);
  const char* g = static_cast<const char*>(A.g) + base * gsize(A.gtype);
  void* lowp = fn_l == L_NONE ? nullptr : static_cast<char*>(A.lowp) + base * 2;
  int64_t a = 0;
  for (int k = 0; k < A.nseg && a < len; ++k) {
    int64_t e = A.seg_end[k] - base;
    if (e <= a) continue;
    if (e > len) e = len;
    Scalars s = A.s;
    s.decay = A.seg_decay[k];
    fn(pp, g, mp, vp, lowp, a, e, s, pp, mp, vp);
    a = e;
  }
  if (A.ptype == P_BF16) {
    uint16_t* out = static_cast<uint16_t*>(A.p) + base;
    sr_bf16(P, out, len, A.key + A.index0 + static_cast<uint32_t>(base));
    if (A.ltype == L_BF16) std::memcpy(static_cast<uint16_t*>(A.lowp) + base, out, 2 * len);
    else if (A.ltype == L_F32) widen_bf16(out, static_cast<float*>(A.lowp) + base, len);
  } else if (A.ltype == L_F32) {
    std::memcpy(static_cast<float*>(A.lowp) + base, pp, 4 * len);
  }
  if (A.mtype == M_BF16) {
    narrow_bf16(M, static_cast<uint16_t*>(A.m) + base, len);
    narrow_bf16(V, static_cast<uint16_t*>(A.v) + base, len);
  } else if (A.mtype == M_INT8) {
    float am = abs_max(M, len), av = abs_max(V, len);
    A.ms[base / kQ] = am;
    A.vs[base / kQ] = av;
    encode_m8(M, am > 0.0f ? 1.0f / am : 0.0f, static_cast<int8_t*>(A.m) + base, len);
    encode_v8(V, av > 0.0f ? 1.0f / av : 0.0f, static_cast<uint8_t*>(A.v) + base, len);
  }
}

}  // namespace

// ---- the fused block paths: decode, AdamW, stochastic rounding and the moments' maxima in one loop ----
// For a run of blocks whose lengths are multiples of 16 (only a stage's last block may not be, and
// takes qblock above): the same operations in the same order as qblock (decode, the fp32 AdamW of
// run_avx512 / run_avx2 with bc2s = 1, encode), so the same bits, with one pass over the block's
// memory and one over its moments' codes instead of eight. Decay is per element when segments split a
// block. The constants are set once a run, not once a block: at 256 elements a block, that showed.
#if FUYOU_X86
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c")
namespace {

inline __m256i narrow_rne_512(__m512 x) {
  __m512i u = _mm512_castps_si512(x);
  __m512i r = _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                               _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1))));
  r = _mm512_srli_epi32(r, 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

template <int G, int PT, int MT, int LT>
void qblocks_avx512(const QArgs& A, int64_t b, int64_t e) {
  const Scalars& s = A.s;
  const __m512 b2 = _mm512_set1_ps(s.b2), c2 = _mm512_set1_ps(s.c2);
  const __m512 eps = _mm512_set1_ps(s.eps), ns = _mm512_set1_ps(s.ns), gs = _mm512_set1_ps(s.gs);
  const __m512 coeff = _mm512_set1_ps(s.w_small ? s.w1 : s.w1m1);
  const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  alignas(64) float M[kQ], V[kQ], Dbuf[kQ];
  int seg = 0;
  for (int64_t base = b; base < e; base += kQ) {
    const int len = static_cast<int>(e - base < kQ ? e - base : kQ);
    float decay;
    const float* D = block_decay(A, base, len, seg, Dbuf, &decay);
    const __m512 dec1 = _mm512_set1_ps(decay);
    __m512i mmax = _mm512_setzero_si512(), vmax = _mm512_setzero_si512();
    const __m512i absmask = _mm512_set1_epi32(0x7FFFFFFF);
    float am = 0.0f, av = 0.0f;
    if (MT == M_INT8) { am = A.ms[base / kQ]; av = A.vs[base / kQ]; }
    const __m512 amv = _mm512_set1_ps(am), avv = _mm512_set1_ps(av);
    const char* g = static_cast<const char*>(A.g) + base * gsize(G);
    // the stochastic rounding's element indices (Note: [Compressed state]), advanced a vector at a time
    __m512i idx = _mm512_add_epi32(_mm512_set1_epi32(static_cast<int>(A.key + A.index0 + static_cast<uint32_t>(base))), lane);
    for (int i = 0; i < len; i += 16, idx = _mm512_add_epi32(idx, _mm512_set1_epi32(16))) {
      const int64_t k = base + i;
      __m512 pi;
      if constexpr (PT == P_F32) pi = _mm512_loadu_ps(static_cast<const float*>(A.p) + k);
      else pi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(A.p) + k))), 16));
      __m512 mi, vi;
      if constexpr (MT == M_F32) {
        mi = _mm512_loadu_ps(static_cast<const float*>(A.m) + k);
        vi = _mm512_loadu_ps(static_cast<const float*>(A.v) + k);
      } else if constexpr (MT == M_BF16) {
        mi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(A.m) + k))), 16));
        vi = _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(
            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(A.v) + k))), 16));
      } else {
        __m512i q = _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(A.m) + k)));
        __m512i c = _mm512_abs_epi32(q);
        __m512i sign = _mm512_and_si512(q, _mm512_set1_epi32(static_cast<int>(0x80000000u)));
        __m512i bits = _mm512_maskz_slli_epi32(_mm512_test_epi32_mask(c, c), _mm512_add_epi32(c, _mm512_set1_epi32(kMBias)), 20);
        mi = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_or_si512(bits, sign)), amv);
        __m512i u = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(A.v) + k)));
        vi = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(kVBias)), 20)), avv);
      }
      // the fp32 AdamW, as run_avx512
      __m512 gi = _mm512_mul_ps(load_grad_512<G>(g, i), gs);
      pi = _mm512_mul_ps(pi, D ? _mm512_loadu_ps(D + i) : dec1);
      mi = _mm512_fmadd_ps(coeff, _mm512_sub_ps(gi, mi), s.w_small ? mi : gi);
      vi = _mm512_mul_ps(vi, b2);
      vi = _mm512_fmadd_ps(_mm512_mul_ps(c2, gi), gi, vi);
      __m512 d = _mm512_add_ps(_mm512_sqrt_ps(vi), eps);  // bc2s is 1 here (fuyou_adamw_q_step)
      pi = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(ns, mi), d));
      if constexpr (PT == P_F32) {
        _mm512_storeu_ps(static_cast<float*>(A.p) + k, pi);
        if constexpr (LT == L_BF16 || LT == L_F16) store_lowp_512<LT>(A.lowp, k, pi);
        if constexpr (LT == L_F32) _mm512_storeu_ps(static_cast<float*>(A.lowp) + k, pi);
      } else {
        __m512i u = _mm512_castps_si512(pi);
        __m512i r = _mm512_srli_epi32(_mm512_mullo_epi32(idx, _mm512_set1_epi32(static_cast<int>(0x9E3779B1u))), 16);
        __m512i b = _mm512_srli_epi32(_mm512_add_epi32(u, r), 16);
        __mmask16 nan = _mm512_cmp_ps_mask(pi, pi, _CMP_UNORD_Q);
        b = _mm512_mask_mov_epi32(b, nan, _mm512_set1_epi32(0x7FC0));
        __m256i h = _mm512_cvtepi32_epi16(b);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(A.p) + k), h);
        if constexpr (LT == L_BF16) _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(A.lowp) + k), h);
        if constexpr (LT == L_F32) _mm512_storeu_ps(static_cast<float*>(A.lowp) + k, _mm512_castsi512_ps(_mm512_slli_epi32(b, 16)));
      }
      if constexpr (MT == M_F32) {
        _mm512_storeu_ps(static_cast<float*>(A.m) + k, mi);
        _mm512_storeu_ps(static_cast<float*>(A.v) + k, vi);
      } else if constexpr (MT == M_BF16) {  // round to nearest even, stored normally (read again next step)
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(A.m) + k), narrow_rne_512(mi));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(A.v) + k), narrow_rne_512(vi));
      } else {
        _mm512_store_ps(M + i, mi);
        _mm512_store_ps(V + i, vi);
        mmax = _mm512_max_epu32(mmax, _mm512_and_si512(_mm512_castps_si512(mi), absmask));
        vmax = _mm512_max_epu32(vmax, _mm512_and_si512(_mm512_castps_si512(vi), absmask));
      }
    }
    if constexpr (MT == M_INT8) {
      uint32_t mb = _mm512_reduce_max_epu32(mmax), vb = _mm512_reduce_max_epu32(vmax);
      float amn = from_bits(mb), avn = from_bits(vb);
      A.ms[base / kQ] = amn;
      A.vs[base / kQ] = avn;
      const __m512 mi_inv = _mm512_set1_ps(amn > 0.0f ? 1.0f / amn : 0.0f);
      const __m512 vi_inv = _mm512_set1_ps(avn > 0.0f ? 1.0f / avn : 0.0f);
      const __m512i mk = _mm512_set1_epi32(kMRound), vk = _mm512_set1_epi32(kVRound);
      // Four vectors at a time, narrowed by packs (their saturation is the clamp at 0, and at 255 for v)
      // and one permute back to element order: fewer operations than a vpmovdb a vector.
      const __m512i perm = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
      const __m512i c127 = _mm512_set1_epi16(127);
      int i = 0;
      for (; i + 64 <= len; i += 64) {
        __m512i cm[4], sm[4], cv[4];
        for (int j = 0; j < 4; ++j) {
          __m512i u = _mm512_castps_si512(_mm512_load_ps(M + i + 16 * j));
          __m512i xb = _mm512_castps_si512(_mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(u, absmask)), mi_inv));
          cm[j] = _mm512_srai_epi32(_mm512_add_epi32(xb, mk), 20);  // code - bias (packs clamp it)
          sm[j] = _mm512_srai_epi32(u, 31);                         // 0 or -1
          __m512i yb = _mm512_castps_si512(_mm512_mul_ps(_mm512_load_ps(V + i + 16 * j), vi_inv));
          cv[j] = _mm512_srai_epi32(_mm512_add_epi32(yb, vk), 20);
        }
        __m512i w0 = _mm512_min_epu16(_mm512_packus_epi32(cm[0], cm[1]), c127);
        __m512i w1 = _mm512_min_epu16(_mm512_packus_epi32(cm[2], cm[3]), c127);
        __m512i s0 = _mm512_packs_epi32(sm[0], sm[1]), s1 = _mm512_packs_epi32(sm[2], sm[3]);
        w0 = _mm512_sub_epi16(_mm512_xor_si512(w0, s0), s0);
        w1 = _mm512_sub_epi16(_mm512_xor_si512(w1, s1), s1);
        _mm512_storeu_si512(static_cast<int8_t*>(A.m) + base + i, _mm512_permutexvar_epi32(perm, _mm512_packs_epi16(w0, w1)));
        __m512i z = _mm512_packus_epi16(_mm512_packus_epi32(cv[0], cv[1]), _mm512_packus_epi32(cv[2], cv[3]));
        _mm512_storeu_si512(static_cast<uint8_t*>(A.v) + base + i, _mm512_permutexvar_epi32(perm, z));
      }
      for (; i < len; i += 16) {
        __m512i u = _mm512_castps_si512(_mm512_load_ps(M + i));
        __m512 x = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(u, absmask)), mi_inv);
        __m512i c = _mm512_srai_epi32(_mm512_add_epi32(_mm512_castps_si512(x), mk), 20);
        c = _mm512_min_epi32(_mm512_max_epi32(c, _mm512_setzero_si512()), _mm512_set1_epi32(127));
        __mmask16 neg = _mm512_movepi32_mask(u);
        c = _mm512_mask_sub_epi32(c, neg, _mm512_setzero_si512(), c);
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<int8_t*>(A.m) + base + i), _mm512_cvtepi32_epi8(c));
        __m512 y = _mm512_mul_ps(_mm512_load_ps(V + i), vi_inv);
        __m512i cv = _mm512_srai_epi32(_mm512_add_epi32(_mm512_castps_si512(y), vk), 20);
        cv = _mm512_min_epi32(_mm512_max_epi32(cv, _mm512_setzero_si512()), _mm512_set1_epi32(255));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint8_t*>(A.v) + base + i), _mm512_cvtepi32_epi8(cv));
      }
    }
  }
}

}  // namespace
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace {

inline __m128i narrow_rne_256(__m256 x) {
  __m256i u = _mm256_castps_si256(x);
  __m256i r = _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                               _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1))));
  r = _mm256_srli_epi32(r, 16);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q)));
  return _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
}

inline __m256 widen_bf16_256(const uint16_t* h) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h))), 16));
}

inline uint32_t hmax_epu32(__m256i x) {
  alignas(32) uint32_t t[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(t), x);
  uint32_t m = 0;
  for (int j = 0; j < 8; ++j) m = t[j] > m ? t[j] : m;
  return m;
}

template <int G, int PT, int MT, int LT>
void qblocks_avx2(const QArgs& A, int64_t b, int64_t e) {
  const Scalars& s = A.s;
  const __m256 b2 = _mm256_set1_ps(s.b2), c2 = _mm256_set1_ps(s.c2);
  const __m256 eps = _mm256_set1_ps(s.eps), ns = _mm256_set1_ps(s.ns), gs = _mm256_set1_ps(s.gs);
  const __m256 coeff = _mm256_set1_ps(s.w_small ? s.w1 : s.w1m1);
  const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
  const __m256i absmask = _mm256_set1_epi32(0x7FFFFFFF);
  alignas(32) float M[kQ], V[kQ], Dbuf[kQ];
  int seg = 0;
  for (int64_t base = b; base < e; base += kQ) {
    const int len = static_cast<int>(e - base < kQ ? e - base : kQ);
    float decay;
    const float* D = block_decay(A, base, len, seg, Dbuf, &decay);
    const __m256 dec1 = _mm256_set1_ps(decay);
    __m256i mmax = _mm256_setzero_si256(), vmax = _mm256_setzero_si256();
    float am = 0.0f, av = 0.0f;
    if (MT == M_INT8) { am = A.ms[base / kQ]; av = A.vs[base / kQ]; }
    const __m256 amv = _mm256_set1_ps(am), avv = _mm256_set1_ps(av);
    const char* g = static_cast<const char*>(A.g) + base * gsize(G);
    __m256i idx = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(A.key + A.index0 + static_cast<uint32_t>(base))), lane);
    for (int i = 0; i < len; i += 8, idx = _mm256_add_epi32(idx, _mm256_set1_epi32(8))) {
      const int64_t k = base + i;
      __m256 pi;
      if constexpr (PT == P_F32) pi = _mm256_loadu_ps(static_cast<const float*>(A.p) + k);
      else pi = widen_bf16_256(static_cast<const uint16_t*>(A.p) + k);
      __m256 mi, vi;
      if constexpr (MT == M_F32) {
        mi = _mm256_loadu_ps(static_cast<const float*>(A.m) + k);
        vi = _mm256_loadu_ps(static_cast<const float*>(A.v) + k);
      } else if constexpr (MT == M_BF16) {
        mi = widen_bf16_256(static_cast<const uint16_t*>(A.m) + k);
        vi = widen_bf16_256(static_cast<const uint16_t*>(A.v) + k);
      } else {
        __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const int8_t*>(A.m) + k)));
        __m256i c = _mm256_abs_epi32(q);
        __m256i sign = _mm256_and_si256(q, _mm256_set1_epi32(static_cast<int>(0x80000000u)));
        __m256i nz = _mm256_cmpgt_epi32(c, _mm256_setzero_si256());
        __m256i bits = _mm256_and_si256(_mm256_slli_epi32(_mm256_add_epi32(c, _mm256_set1_epi32(kMBias)), 20), nz);
        mi = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_or_si256(bits, sign)), amv);
        __m256i u = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(static_cast<const uint8_t*>(A.v) + k)));
        vi = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(kVBias)), 20)), avv);
      }
      __m256 gi = _mm256_mul_ps(load_grad_256<G>(g, i), gs);
      pi = _mm256_mul_ps(pi, D ? _mm256_loadu_ps(D + i) : dec1);
      mi = _mm256_fmadd_ps(coeff, _mm256_sub_ps(gi, mi), s.w_small ? mi : gi);
      vi = _mm256_mul_ps(vi, b2);
      vi = _mm256_fmadd_ps(_mm256_mul_ps(c2, gi), gi, vi);
      __m256 d = _mm256_add_ps(_mm256_sqrt_ps(vi), eps);  // bc2s is 1 here
      pi = _mm256_add_ps(pi, _mm256_div_ps(_mm256_mul_ps(ns, mi), d));
      if constexpr (PT == P_F32) {
        _mm256_storeu_ps(static_cast<float*>(A.p) + k, pi);
        if constexpr (LT == L_BF16 || LT == L_F16) store_lowp_256<LT>(A.lowp, k, pi);
        if constexpr (LT == L_F32) _mm256_storeu_ps(static_cast<float*>(A.lowp) + k, pi);
      } else {
        __m256i u = _mm256_castps_si256(pi);
        __m256i r = _mm256_srli_epi32(_mm256_mullo_epi32(idx, _mm256_set1_epi32(static_cast<int>(0x9E3779B1u))), 16);
        __m256i b = _mm256_srli_epi32(_mm256_add_epi32(u, r), 16);
        b = _mm256_blendv_epi8(b, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(_mm256_cmp_ps(pi, pi, _CMP_UNORD_Q)));
        __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(b), _mm256_extracti128_si256(b, 1));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(A.p) + k), h);
        if constexpr (LT == L_BF16) _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(A.lowp) + k), h);
        if constexpr (LT == L_F32) _mm256_storeu_ps(static_cast<float*>(A.lowp) + k, _mm256_castsi256_ps(_mm256_slli_epi32(b, 16)));
      }
      if constexpr (MT == M_F32) {
        _mm256_storeu_ps(static_cast<float*>(A.m) + k, mi);
        _mm256_storeu_ps(static_cast<float*>(A.v) + k, vi);
      } else if constexpr (MT == M_BF16) {
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(A.m) + k), narrow_rne_256(mi));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(A.v) + k), narrow_rne_256(vi));
      } else {
        _mm256_store_ps(M + i, mi);
        _mm256_store_ps(V + i, vi);
        mmax = _mm256_max_epu32(mmax, _mm256_and_si256(_mm256_castps_si256(mi), absmask));
        vmax = _mm256_max_epu32(vmax, _mm256_and_si256(_mm256_castps_si256(vi), absmask));
      }
    }
    if constexpr (MT == M_INT8) {
      float amn = from_bits(hmax_epu32(mmax)), avn = from_bits(hmax_epu32(vmax));
      A.ms[base / kQ] = amn;
      A.vs[base / kQ] = avn;
      const __m256 mi_inv = _mm256_set1_ps(amn > 0.0f ? 1.0f / amn : 0.0f);
      const __m256 vi_inv = _mm256_set1_ps(avn > 0.0f ? 1.0f / avn : 0.0f);
      const __m256i mk = _mm256_set1_epi32(kMRound), vk = _mm256_set1_epi32(kVRound), zero = _mm256_setzero_si256();
      // Four vectors at a time, as the AVX-512 path: packs narrow and clamp, one permute restores the order
      const __m256i perm = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
      const __m256i c127 = _mm256_set1_epi16(127);
      int i = 0;
      for (; i + 32 <= len; i += 32) {
        __m256i cm[4], sm[4], cv[4];
        for (int j = 0; j < 4; ++j) {
          __m256i u = _mm256_castps_si256(_mm256_load_ps(M + i + 8 * j));
          __m256i xb = _mm256_castps_si256(_mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(u, absmask)), mi_inv));
          cm[j] = _mm256_srai_epi32(_mm256_add_epi32(xb, mk), 20);
          sm[j] = _mm256_srai_epi32(u, 31);
          __m256i yb = _mm256_castps_si256(_mm256_mul_ps(_mm256_load_ps(V + i + 8 * j), vi_inv));
          cv[j] = _mm256_srai_epi32(_mm256_add_epi32(yb, vk), 20);
        }
        __m256i w0 = _mm256_min_epu16(_mm256_packus_epi32(cm[0], cm[1]), c127);
        __m256i w1 = _mm256_min_epu16(_mm256_packus_epi32(cm[2], cm[3]), c127);
        __m256i s0 = _mm256_packs_epi32(sm[0], sm[1]), s1 = _mm256_packs_epi32(sm[2], sm[3]);
        w0 = _mm256_sub_epi16(_mm256_xor_si256(w0, s0), s0);
        w1 = _mm256_sub_epi16(_mm256_xor_si256(w1, s1), s1);
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<int8_t*>(A.m) + base + i),
                            _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w0, w1), perm));
        __m256i z = _mm256_packus_epi16(_mm256_packus_epi32(cv[0], cv[1]), _mm256_packus_epi32(cv[2], cv[3]));
        _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint8_t*>(A.v) + base + i), _mm256_permutevar8x32_epi32(z, perm));
      }
      for (; i < len; i += 8) {
        __m256i u = _mm256_castps_si256(_mm256_load_ps(M + i));
        __m256 x = _mm256_mul_ps(_mm256_castsi256_ps(_mm256_and_si256(u, absmask)), mi_inv);
        __m256i c = _mm256_srai_epi32(_mm256_add_epi32(_mm256_castps_si256(x), mk), 20);
        c = _mm256_min_epi32(_mm256_max_epi32(c, zero), _mm256_set1_epi32(127));
        __m256i neg = _mm256_srai_epi32(u, 31);  // 0 or -1
        c = _mm256_sub_epi32(_mm256_xor_si256(c, neg), neg);
        __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(c), _mm256_extracti128_si256(c, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<int8_t*>(A.m) + base + i), _mm_packs_epi16(w, w));
        __m256 y = _mm256_mul_ps(_mm256_load_ps(V + i), vi_inv);
        __m256i cv = _mm256_srai_epi32(_mm256_add_epi32(_mm256_castps_si256(y), vk), 20);
        cv = _mm256_min_epi32(_mm256_max_epi32(cv, zero), _mm256_set1_epi32(255));
        __m128i wv = _mm_packus_epi32(_mm256_castsi256_si128(cv), _mm256_extracti128_si256(cv, 1));
        _mm_storel_epi64(reinterpret_cast<__m128i*>(static_cast<uint8_t*>(A.v) + base + i), _mm_packus_epi16(wv, wv));
      }
    }
  }
}

}  // namespace
#pragma GCC pop_options
#endif

namespace {

using QFn = void (*)(const QArgs&, int64_t, int64_t);

template <int G, int PT, int MT>
QFn pick_q_l(int lt, int isa) {
#if FUYOU_X86
  if (isa == ISA_AVX512) {
    if (lt == L_BF16) return qblocks_avx512<G, PT, MT, L_BF16>;
    if (lt == L_F16 && PT == P_F32) return qblocks_avx512<G, PT, MT, L_F16>;
    if (lt == L_F32) return qblocks_avx512<G, PT, MT, L_F32>;
    if (lt == L_NONE) return qblocks_avx512<G, PT, MT, L_NONE>;
  } else if (isa == ISA_AVX2) {
    if (lt == L_BF16) return qblocks_avx2<G, PT, MT, L_BF16>;
    if (lt == L_F16 && PT == P_F32) return qblocks_avx2<G, PT, MT, L_F16>;
    if (lt == L_F32) return qblocks_avx2<G, PT, MT, L_F32>;
    if (lt == L_NONE) return qblocks_avx2<G, PT, MT, L_NONE>;
  }
#endif
  (void)lt;
  (void)isa;
  return nullptr;
}

template <int G, int PT>
QFn pick_q_m(int mt, int lt, int isa) {
  if (mt == M_F32) return pick_q_l<G, PT, M_F32>(lt, isa);
  if (mt == M_BF16) return pick_q_l<G, PT, M_BF16>(lt, isa);
  return pick_q_l<G, PT, M_INT8>(lt, isa);
}

template <int G>
QFn pick_q_p(int pt, int mt, int lt, int isa) {
  return pt == P_F32 ? pick_q_m<G, P_F32>(mt, lt, isa) : pick_q_m<G, P_BF16>(mt, lt, isa);
}

// The fused path for this call, or nullptr: qblock for every block. AVX-512 needs BW, VL and DQ too
// (else AVX2's path runs).
QFn pick_q(const QArgs& A) {
#if FUYOU_X86
  int isa = A.isa;
  __builtin_cpu_init();
  if (isa == ISA_AVX512 && !(__builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
                             __builtin_cpu_supports("avx512dq")))
    isa = ISA_AVX2;
  if (isa == ISA_SCALAR) return nullptr;
  if (A.gtype == G_F32) return pick_q_p<G_F32>(A.ptype, A.mtype, A.ltype, isa);
  if (A.gtype == G_BF16) return pick_q_p<G_BF16>(A.ptype, A.mtype, A.ltype, isa);
  return pick_q_p<G_F16>(A.ptype, A.mtype, A.ltype, isa);
#else
  (void)A;
  return nullptr;
#endif
}

// The blocks of [b, e) (b a multiple of kQ): every block through the fused path when there is one,
// but a last block whose length is not a multiple of 16, which takes qblock.
void qblocks(const QArgs& A, QFn fast, int64_t b, int64_t e) {
  int64_t vec_end = b;
  if (fast != nullptr) vec_end = (e - b) % kQ % 16 == 0 ? e : e - (e - b) % kQ;
  if (vec_end > b) fast(A, b, vec_end);
  for (int64_t base = vec_end; base < e; base += kQ) qblock(A, base, static_cast<int>(e - base < kQ ? e - base : kQ));
}

}  // namespace

extern "C" {

// One AdamW step over n elements of a compressed state (Note: [Compressed state]); element j is the
// stage's element index0 + j (index0 a multiple of 256; ms/vs point at the scale of element 0's
// block). ptype 0 fp32 / 1 bf16; mtype 0 fp32 / 1 bf16 / 3 int8; ltype 0 none, 1 bf16, 2 fp16,
// 3 fp32. Segments: nseg (end, decay) pairs covering [0, n) in order. Returns the ISA used.
int fuyou_adamw_q_step(void* p, int ptype, const void* g, int gtype, void* m, void* v, int mtype,
                       float* ms, float* vs, void* lowp, int ltype, int64_t n, int64_t index0, uint32_t key,
                       const int64_t* seg_end, const double* seg_decay_d, int nseg,
                       double w1, double beta2, double c2, double bc2_sqrt, double eps, double neg_step,
                       double grad_scale, int num_threads, int isa,
                       const void* ps, const void* ms0, const void* vs0, const float* mss, const float* vss) {
  int best = best_isa();
  if (isa < 0 || isa > best) isa = best;
  QArgs A;
  A.p = p; A.ptype = ptype; A.g = g; A.gtype = gtype; A.m = m; A.v = v; A.mtype = mtype; A.ms = ms; A.vs = vs;
  A.lowp = lowp; A.ltype = ltype; A.n = n; A.index0 = static_cast<uint32_t>(index0); A.key = key;
  A.seg_end = seg_end; A.nseg = nseg; A.isa = isa;
  float decays[64];
  if (nseg > 64) return -1;
  for (int k = 0; k < nseg; ++k) decays[k] = static_cast<float>(seg_decay_d[k]);
  A.seg_decay = decays;
  // One division an element instead of two (Note: [Compressed state], 2): sqrt(v) / bc2s + eps times
  // bc2s is sqrt(v) + eps * bc2s, so the step is (ns * bc2s) * m / (sqrt(v) + eps * bc2s), the two
  // products rounded from double. qblock's path divides by bc2s = 1, which is exact. (The decay is per
  // segment: decays above.)
  A.s = make_scalars(1.0, w1, beta2, c2, 1.0, eps * bc2_sqrt, neg_step * bc2_sqrt, grad_scale);

  int64_t nblocks = (n + kBlock - 1) / kBlock;
  int nt = num_threads < 1 ? 1 : num_threads;
  if (nt > nblocks) nt = static_cast<int>(nblocks);
  QFn fast = pick_q(A);
  const size_t psize = ptype == P_F32 ? 4 : 2, msize = mtype == M_F32 ? 4 : (mtype == M_BF16 ? 2 : 1);
  auto body = [&](int64_t blk) {
    int64_t b = blk * kBlock, e = b + kBlock < n ? b + kBlock : n;
    if (ps == nullptr) {
      qblocks(A, fast, b, e);
    } else {
      for (int64_t a = b; a < e; a += kSub) {  // Note: [Out of place]; a and kSub are multiples of kQ
        int64_t z = a + kSub < e ? a + kSub : e;
        std::memcpy(static_cast<char*>(p) + a * psize, static_cast<const char*>(ps) + a * psize, (z - a) * psize);
        std::memcpy(static_cast<char*>(m) + a * msize, static_cast<const char*>(ms0) + a * msize, (z - a) * msize);
        std::memcpy(static_cast<char*>(v) + a * msize, static_cast<const char*>(vs0) + a * msize, (z - a) * msize);
        if (mtype == M_INT8) {
          int64_t q0 = a / kQ, q1 = (z + kQ - 1) / kQ;
          std::memcpy(ms + q0, mss + q0, 4 * (q1 - q0));
          std::memcpy(vs + q0, vss + q0, 4 * (q1 - q0));
        }
        qblocks(A, fast, a, z);
      }
    }
    _mm_sfence_if_x86();  // the compute copy's non-temporal stores, once per work block (Note: [Non-temporal copy])
  };
  if (nt <= 1) {
    for (int64_t blk = 0; blk < nblocks; ++blk) body(blk);
  } else {
    pool().run(nt, nblocks, body);
  }
  return isa;
}

}  // extern "C"

// ---- LoRA's quantised base (int8, NF4: fuyou/models/quant.py) -------------------------------------
// out[r, c] = float(q[r, c]) * scale[r], one fp32 multiply, stored as fp32 or rounded to nearest even
// bf16: the bits of torch.mul(q, scale[:, None], out=out) (and of autocast's rounding of the fp32
// product), vectorised by the compiler for each ISA. The mixed-dtype torch op runs ~2.8 ns an element
// on this project's CPUs, which made an int8 base twice as slow as a bf16 one on the CPU.
namespace {

__attribute__((target_clones("avx512f", "avx2", "default")))
void dequant_row_f32(const int8_t* __restrict q, float s, float* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<float>(q[i]) * s;
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void dequant_row_bf16(const int8_t* __restrict q, float s, uint16_t* __restrict out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    uint32_t u;
    float x = static_cast<float>(q[i]) * s;  // finite: |q| <= 127 and s finite
    std::memcpy(&u, &x, 4);
    out[i] = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
  }
}

}  // namespace

extern "C" {

// rows x cols int8 codes (row-major) times one fp32 scale per row; otype 0 fp32, 1 bf16. Returns 0.
int fuyou_dequant_rows(const int8_t* q, const float* scale, void* out, int otype, int64_t rows, int64_t cols,
                       int num_threads) {
  int64_t per = cols >= kBlock ? 1 : kBlock / (cols > 0 ? cols : 1);  // rows per work block (~64K elements)
  int64_t nblocks = (rows + per - 1) / per;
  auto body = [&](int64_t blk) {
    int64_t r0 = blk * per, r1 = r0 + per < rows ? r0 + per : rows;
    for (int64_t r = r0; r < r1; ++r) {
      if (otype == 1) dequant_row_bf16(q + r * cols, scale[r], static_cast<uint16_t*>(out) + r * cols, cols);
      else dequant_row_f32(q + r * cols, scale[r], static_cast<float*>(out) + r * cols, cols);
    }
  };
  run_blocks(num_threads, nblocks, body);
  return 0;
}

}  // extern "C"

// NF4 (fuyou/models/quant.py): n values from 4-bit codes (two to a byte, the even element in the low
// nibble) in blocks of 64, value = level[code] * absmax[block] in fp32, stored as fp32 or rounded to
// nearest even bf16: the bits of torch's levels[idx] * absmax[:, None] and its rounding (finite absmax;
// a NaN or inf one, from a checkpoint that holds one, gives NaN or inf, not necessarily torch's NaN bits).
namespace {

constexpr float kNF4[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                            -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                            0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                            0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                            0.7229568362236023f, 1.0f};
constexpr int64_t kNF4Block = 64;

// One block of up to 64 values: the 16 levels times its absmax first, then a table lookup per value.
template <bool BF16>
void dequant_nf4_block(const uint8_t* __restrict c, float s, void* __restrict out, int64_t n) {
  float t[16];
  for (int k = 0; k < 16; ++k) t[k] = kNF4[k] * s;
  for (int64_t i = 0; i < n; ++i) {
    float x = t[(c[i >> 1] >> ((i & 1) * 4)) & 15];
    if constexpr (BF16) {
      uint32_t u;
      std::memcpy(&u, &x, 4);
      static_cast<uint16_t*>(out)[i] = static_cast<uint16_t>((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
    } else {
      static_cast<float*>(out)[i] = x;
    }
  }
}

#if FUYOU_X86
// 16 values a time: 8 bytes of codes split into 16 nibbles in element order, each the index of a lane of
// the block's scaled table (one permute); the same products as above, so the same bits.
template <bool BF16>
__attribute__((target("avx512f")))
void dequant_nf4_block_avx512(const uint8_t* __restrict c, float s, void* __restrict out, int64_t n) {
  const __m512 t = _mm512_mul_ps(_mm512_loadu_ps(kNF4), _mm512_set1_ps(s));
  const __m128i low = _mm_set1_epi8(0x0F);
  int64_t i = 0;
  for (; i + 16 <= n; i += 16) {
    __m128i b = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(c + i / 2));
    __m128i nib = _mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));
    __m512 x = _mm512_permutexvar_ps(_mm512_cvtepu8_epi32(nib), t);
    if constexpr (BF16) {
      __m512i u = _mm512_castps_si512(x);
      __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7FFF),
                                    _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)))), 16);
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + i), _mm512_cvtepi32_epi16(r));
    } else {
      _mm512_storeu_ps(static_cast<float*>(out) + i, x);
    }
  }
  if (i < n) {  // a partial last block: the scalar path from an even element
    char* o = static_cast<char*>(out) + i * (BF16 ? 2 : 4);
    dequant_nf4_block<BF16>(c + i / 2, s, o, n - i);
  }
}

// 8 values a time: 4 bytes of codes split into 8 nibbles in element order; the 16 scaled levels are two
// 8-lane tables, one permute each, the code's bit 3 (shifted into the sign) choosing between them.
template <bool BF16>
__attribute__((target("avx2")))
void dequant_nf4_block_avx2(const uint8_t* __restrict c, float s, void* __restrict out, int64_t n) {
  const __m256 sv = _mm256_set1_ps(s);
  const __m256 lo = _mm256_mul_ps(_mm256_loadu_ps(kNF4), sv), hi = _mm256_mul_ps(_mm256_loadu_ps(kNF4 + 8), sv);
  const __m128i low = _mm_set1_epi8(0x0F);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    int32_t w;
    std::memcpy(&w, c + i / 2, 4);
    __m128i b = _mm_cvtsi32_si128(w);
    __m128i nib = _mm_unpacklo_epi8(_mm_and_si128(b, low), _mm_and_si128(_mm_srli_epi16(b, 4), low));
    __m256i idx = _mm256_cvtepu8_epi32(nib);
    __m256 x = _mm256_blendv_ps(_mm256_permutevar8x32_ps(lo, idx), _mm256_permutevar8x32_ps(hi, idx),
                                _mm256_castsi256_ps(_mm256_slli_epi32(idx, 28)));
    if constexpr (BF16) {
      __m256i u = _mm256_castps_si256(x);
      __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7FFF),
                                    _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)))), 16);
      __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + i), h);
    } else {
      _mm256_storeu_ps(static_cast<float*>(out) + i, x);
    }
  }
  if (i < n) dequant_nf4_block<BF16>(c + i / 2, s, static_cast<char*>(out) + i * (BF16 ? 2 : 4), n - i);
}
#endif

}  // namespace

extern "C" {

// n values of NF4 codes (ceil(n / 64) blocks) with their fp32 absmax; otype 0 fp32, 1 bf16; isa as
// fuyou_adamw_step's (-1: the best this CPU has; the paths give the same bits). Returns the ISA used.
int fuyou_dequant_nf4(const uint8_t* codes, const float* absmax, void* out, int otype, int64_t n, int num_threads,
                      int isa) {
  const int64_t per = kBlock / kNF4Block;  // NF4 blocks per work block
  int64_t nb = (n + kNF4Block - 1) / kNF4Block, nblocks = (nb + per - 1) / per;
  using Fn = void (*)(const uint8_t*, float, void*, int64_t);
  int best = best_isa();
  if (isa < 0 || isa > best) isa = best;
  Fn fn = otype == 1 ? dequant_nf4_block<true> : dequant_nf4_block<false>;
#if FUYOU_X86
  if (isa == ISA_AVX512) fn = otype == 1 ? dequant_nf4_block_avx512<true> : dequant_nf4_block_avx512<false>;
  else if (isa == ISA_AVX2) fn = otype == 1 ? dequant_nf4_block_avx2<true> : dequant_nf4_block_avx2<false>;
#else
  isa = ISA_SCALAR;
#endif
  const int64_t osize = otype == 1 ? 2 : 4;
  auto body = [&](int64_t blk) {
    int64_t b1 = (blk + 1) * per < nb ? (blk + 1) * per : nb;
    for (int64_t b = blk * per; b < b1; ++b) {
      int64_t at = b * kNF4Block, len = n - at < kNF4Block ? n - at : kNF4Block;
      fn(codes + at / 2, absmax[b], static_cast<char*>(out) + at * osize, len);
    }
  };
  run_blocks(num_threads, nblocks, body);
  return isa;
}

}  // extern "C"

// The quantisers of the same two formats (fuyou/models/quant.py: quantise_rows, quantise_nf4), the bits of
// their torch formulas: int8: s = max|w_row| / 127 (s = 0: divide by 1), q = round half to even of
// w / s clamped to [-127, 127]; NF4: blocks of 64 (the last padded with zeros), a = max|x|, the index of x / a
// (a = 0: / 1) among the 16 levels is the number of midpoints (level[k] + level[k + 1]) / 2 below it.
namespace {

__attribute__((target_clones("avx512f", "avx2", "default")))  // (an inlined, vectorised nearbyint)
void quant_row(const float* __restrict w, int8_t* __restrict q, float* scale, int64_t n) {
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    float a = std::fabs(w[i]);
    m = a > m ? a : m;  // (not fmax: a libm call per element)
  }
  float s = m / 127.0f;
  *scale = s;
  float d = s > 0.0f ? s : 1.0f;
  for (int64_t i = 0; i < n; ++i) {
    float r = std::nearbyint(w[i] / d);
    q[i] = static_cast<int8_t>(r < -127.0f ? -127.0f : (r > 127.0f ? 127.0f : r));
  }
}

__attribute__((target_clones("avx512f", "avx2", "default")))
void quant_nf4_block(const float* __restrict w, uint8_t* __restrict c, float* absmax, int64_t n) {
  float x[kNF4Block] = {0.0f};
  float m = 0.0f;
  for (int64_t i = 0; i < n; ++i) {
    x[i] = w[i];
    float a = std::fabs(w[i]);
    m = a > m ? a : m;
  }
  *absmax = m;
  float d = m > 0.0f ? m : 1.0f;
  float mid[15];
  for (int k = 0; k < 15; ++k) mid[k] = (kNF4[k] + kNF4[k + 1]) / 2.0f;
  uint8_t idx[kNF4Block];
  for (int64_t i = 0; i < kNF4Block; ++i) {
    float v = x[i] / d;
    int k = 0;
    for (int j = 0; j < 15; ++j) k += mid[j] < v;
    idx[i] = static_cast<uint8_t>(k);
  }
  for (int64_t i = 0; i < kNF4Block / 2; ++i) c[i] = static_cast<uint8_t>(idx[2 * i] | (idx[2 * i + 1] << 4));
}

}  // namespace

extern "C" {

int fuyou_quant_rows(const float* w, int8_t* q, float* scale, int64_t rows, int64_t cols, int num_threads) {
  int64_t per = cols >= kBlock ? 1 : kBlock / (cols > 0 ? cols : 1);
  int64_t nblocks = (rows + per - 1) / per;
  auto body = [&](int64_t blk) {
    int64_t r1 = (blk + 1) * per < rows ? (blk + 1) * per : rows;
    for (int64_t r = blk * per; r < r1; ++r) quant_row(w + r * cols, q + r * cols, scale + r, cols);
  };
  run_blocks(num_threads, nblocks, body);
  return 0;
}

int fuyou_quant_nf4(const float* w, uint8_t* codes, float* absmax, int64_t n, int num_threads) {
  const int64_t per = kBlock / kNF4Block;
  int64_t nb = (n + kNF4Block - 1) / kNF4Block, nblocks = (nb + per - 1) / per;
  auto body = [&](int64_t blk) {
    int64_t b1 = (blk + 1) * per < nb ? (blk + 1) * per : nb;
    for (int64_t b = blk * per; b < b1; ++b) {
      int64_t at = b * kNF4Block, len = n - at < kNF4Block ? n - at : kNF4Block;
      quant_nf4_block(w + at, codes + at / 2, absmax + b, len);
    }
  };
  run_blocks(num_threads, nblocks, body);
  return 0;
}

}  // extern "C"

// ---- the sum of squares of a gradient (exact clipping's norm on a CPU device) ------------------------
// Note: [Gradient norm on the CPU] torch's norm of a bf16 or fp16 tensor in fp32 converts it to an fp32
// copy first (6 bytes of traffic an element on top of the 2 read): 69 ms a step for 100M parameters on
// 2 cores, a third of a short step. This reads each element once: squares summed in 16 fp32 lanes over
// runs of 1024 elements, the runs in double, the work blocks in order, so the result does not depend on
// the number of threads. fp32 gradients keep torch's norm (the reference trainer's, bit for bit).
namespace {

template <int G>
inline __attribute__((always_inline)) double sumsq_range(const uint16_t* __restrict x, int64_t n) {
  double total = 0.0;
  int64_t i = 0;
  for (; i + 1024 <= n; i += 1024) {
    float acc[16] = {0};
    for (int j = 0; j < 1024; j += 16)
      for (int k = 0; k < 16; ++k) {
        float v = G == G_BF16 ? bf16_to_f32(x[i + j + k]) : f16_to_f32(x[i + j + k]);
        acc[k] = std::fma(v, v, acc[k]);
      }
    double s = 0.0;
    for (int k = 0; k < 16; ++k) s += acc[k];
    total += s;
  }
  for (; i < n; ++i) {
    double v = G == G_BF16 ? bf16_to_f32(x[i]) : f16_to_f32(x[i]);
    total += v * v;
  }
  return total;
}

// compiled per ISA, with sumsq_range inlined into each
__attribute__((target_clones("avx512f", "avx2", "default")))
double sumsq_bf16(const uint16_t* __restrict x, int64_t n) { return sumsq_range<G_BF16>(x, n); }

__attribute__((target_clones("avx512f", "avx2", "default")))
double sumsq_f16(const uint16_t* __restrict x, int64_t n) { return sumsq_range<G_F16>(x, n); }

}  // namespace

extern "C" {

// Sum of squares of n bf16 (gtype 1) or fp16 (2) values; see the note [Gradient norm on the CPU].
double fuyou_sumsq(const uint16_t* x, int gtype, int64_t n, int num_threads) {
  int64_t nblocks = (n + kBlock - 1) / kBlock;
  std::vector<double> part(static_cast<size_t>(nblocks > 0 ? nblocks : 1), 0.0);
  auto body = [&](int64_t blk) {
    int64_t b = blk * kBlock, e = b + kBlock < n ? b + kBlock : n;
    part[blk] = gtype == G_BF16 ? sumsq_bf16(x + b, e - b) : sumsq_f16(x + b, e - b);
  };
  if (nblocks > 0) run_blocks(num_threads, nblocks, body);
  double total = 0.0;
  for (int64_t b = 0; b < nblocks; ++b) total += part[b];
  return total;
}

}  // extern "C"
