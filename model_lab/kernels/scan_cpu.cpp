// The selective scan's core on a CPU. model_lab.kernels.scan builds this file with torch.utils.cpp_extension.load
// and calls it through ctypes: no torch headers (they take ~25 s to compile; this file takes a few seconds).
//
// Per batch row b and channel d, over t = 0..L-1, with a state h of N lanes:
//   h = exp(dt_t A) * h + (dt_t u_t) B_t,   y_t = sum_n C_t h
// Softplus, delta_bias, D and the silu(z) gate are elementwise and stay in PyTorch (autograd differentiates them).
// Layouts (contiguous, one scalar type; N padded with zeros to NP, a multiple of the vector width W):
//   u, dt, y, gy, gu, gdt: (B, D, L)        A: (D, NP)
//   B, C: fixed (D, NP), or time-major (B, G, L, NP) with G groups of D/G channels
//   h0, glast, gh0, gA: (B, D, NP)           hs: (B, D, NC + 1, NP): the state entering each chunk, then the last
// The forward pass is one pass over L per channel, the N lanes in SIMD registers (GCC/Clang vector extensions),
// channels in parallel on `threads` std::threads that claim work items from an atomic counter (no spinning, no
// OpenMP runtime next to torch's: a thread that the OS does not schedule simply claims fewer items). The backward
// pass walks the chunks in reverse, recomputes each chunk's states from the one stored at its start into an L1-sized buffer, and runs the adjoint state lam backwards. Gradients of a
// selective/grouped B or C are summed over the channels that share them inside a work unit (b, group, part), into
// that unit's own (L, NP) buffer: no atomics, no races.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

struct ScanArgs {
  int64_t batch, dim, len, dstate, groups_b, groups_c, chunk, threads, groups, parts;
  int64_t b_fixed, c_fixed, has_h0, has_glast;
  const void *u, *dt, *A, *B, *C, *h0;
  void *y, *hs;
  const void *gy, *glast;
  void *gu, *gdt, *gA, *gB, *gC, *gh0;  // gB, gC: fixed (B, D, NP), else (B, G, P, L, NP) per-unit sums
};

template <typename T> struct Vec {
  static constexpr int W = 64 / sizeof(T);            // one 64-byte vector: 16 floats or 8 doubles
  typedef T V __attribute__((vector_size(64)));
  typedef int32_t I __attribute__((vector_size(64)));
};

// body(item) for item in [0, n) on `threads` threads (the caller's included); make() builds each thread's state
template <typename Make, typename Body> static void parallel_for(int64_t n, int64_t threads, Make make, Body body) {
  std::atomic<int64_t> next{0};
  auto work = [&] {
    auto state = make();
    for (int64_t i; (i = next.fetch_add(1, std::memory_order_relaxed)) < n;) body(i, state);
  };
  std::vector<std::thread> pool;
  for (int64_t k = 1; k < std::min(threads, n); ++k) pool.emplace_back(work);
  work();
  for (auto& t : pool) t.join();
}
struct NoState {};

template <typename V> static inline V load(const void* p) { V v; std::memcpy(&v, p, sizeof(V)); return v; }
template <typename V> static inline void store(void* p, const V& v) { std::memcpy(p, &v, sizeof(V)); }
template <typename T, typename V> static inline T hsum(const V& v) {
  T s = 0;
  for (int i = 0; i < Vec<T>::W; ++i) s += v[i];
  return s;
}

// exp on float lanes: 2^k p(r) with a degree-6 polynomial (relative error < 3e-7). Inputs below -86.5 give about
// 3e-38 instead of a denormal (denormal arithmetic is 5-30x slower) or 0.
static inline Vec<float>::V vexp(Vec<float>::V x) {
  typedef Vec<float>::V V;
  typedef Vec<float>::I I;
  const V lo = V{} - 86.5f, hi = V{} + 88.3f, magic = V{} + 12582912.0f;    // 1.5 * 2^23: rounds to an integer
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const V kf = (x * 1.44269504088896341f + magic) - magic;
  const V r = (x - kf * 0.693145751953125f) - kf * 1.428606765330187e-06f;
  V p = V{} + 1.0f / 720;
  p = p * r + 1.0f / 120; p = p * r + 1.0f / 24; p = p * r + 1.0f / 6; p = p * r + 0.5f; p = p * r + 1.0f;
  p = p * r + 1.0f;
  const I bits = (__builtin_convertvector(kf, I) + 127) << 23;
  return p * (V)bits;
}
static inline Vec<double>::V vexp(Vec<double>::V x) {
  for (int i = 0; i < Vec<double>::W; ++i) x[i] = std::exp(x[i]);   // float64 is the tests' precision, not a fast path
  return x;
}

// NVT > 0: NP / W known at compile time (the state stays in registers); NVT == 0: any NP up to 16 W
template <typename T, int NVT> struct Scan {
  typedef typename Vec<T>::V V;
  static constexpr int W = Vec<T>::W, NVMAX = NVT ? NVT : 16;
  const ScanArgs& a;
  const int64_t NP, NV, L, D, NC, K;
  explicit Scan(const ScanArgs& a) : a(a), NP(a.dstate), NV(NVT ? NVT : a.dstate / W), L(a.len), D(a.dim),
                                     NC((a.len + a.chunk - 1) / a.chunk), K(a.chunk) {}
  // the row of B (or C) at step t for channel d of batch row b; a fixed one does not move with t
  const T* bc(const void* p, bool fixed, int64_t groups, int64_t b, int64_t d, int64_t t) const {
    if (fixed) return static_cast<const T*>(p) + d * NP;
    return static_cast<const T*>(p) + ((b * groups + d / (D / groups)) * L + t) * NP;
  }
  const T* cin(const void* p) const { return static_cast<const T*>(p); }
  T* out(void* p) const { return static_cast<T*>(p); }

  void forward() const {
    const int64_t sB = a.b_fixed ? 0 : NP, sC = a.c_fixed ? 0 : NP;
    parallel_for(a.batch * D, a.threads, [] { return NoState{}; }, [&](int64_t bd, NoState&) {
      const int64_t b = bd / D, d = bd % D;
      V h[NVMAX], Av[NVMAX];
      for (int64_t j = 0; j < NV; ++j) {
        h[j] = a.has_h0 ? load<V>(cin(a.h0) + bd * NP + j * W) : V{};
        Av[j] = load<V>(cin(a.A) + d * NP + j * W);
      }
      const T *Bt = bc(a.B, a.b_fixed, a.groups_b, b, d, 0), *Ct = bc(a.C, a.c_fixed, a.groups_c, b, d, 0);
      const T *ur = cin(a.u) + bd * L, *dr = cin(a.dt) + bd * L;
      T *yr = out(a.y) + bd * L, *hr = out(a.hs) + bd * (NC + 1) * NP;
      for (int64_t c = 0; c < NC; ++c) {
        for (int64_t j = 0; j < NV; ++j) store(hr + c * NP + j * W, h[j]);   // the state entering chunk c
        const int64_t t1 = (c + 1) * K < L ? (c + 1) * K : L;
        for (int64_t t = c * K; t < t1; ++t, Bt += sB, Ct += sC) {
          const T dtt = dr[t], du = dtt * ur[t];
          V acc = V{};
          for (int64_t j = 0; j < NV; ++j) {
            h[j] = vexp(dtt * Av[j]) * h[j] + du * load<V>(Bt + j * W);
            acc += h[j] * load<V>(Ct + j * W);
          }
          yr[t] = hsum<T>(acc);
        }
      }
      for (int64_t j = 0; j < NV; ++j) store(hr + NC * NP + j * W, h[j]);  // the last state
    });
  }

  void backward() const {
    const int64_t G = a.groups, P = a.parts, DG = D / G, units = a.batch * G * P;
    const int64_t sB = a.b_fixed ? 0 : NP, sC = a.c_fixed ? 0 : NP;
    struct Buffers { std::vector<V> h, a; };               // one chunk's states (after 0..K steps) and exp(dt A)
    auto make = [&] { return Buffers{std::vector<V>((K + 1) * NV), std::vector<V>(K * NV)}; };
    parallel_for(units, a.threads, make, [&](int64_t unit, Buffers& buf) {
        const int64_t b = unit / (G * P), g = (unit / P) % G, p = unit % P;
        T *uB = a.b_fixed ? nullptr : out(a.gB) + unit * L * NP, *uC = a.c_fixed ? nullptr : out(a.gC) + unit * L * NP;
        for (int64_t d = g * DG + p * DG / P; d < g * DG + (p + 1) * DG / P; ++d) {
          const int64_t bd = b * D + d;
          V lam[NVMAX], Av[NVMAX], gAv[NVMAX], gBf[NVMAX], gCf[NVMAX];
          for (int64_t j = 0; j < NV; ++j) {           // lam holds exp(dt_{t+1} A) lam_{t+1}
            lam[j] = a.has_glast ? load<V>(cin(a.glast) + bd * NP + j * W) : V{};
            Av[j] = load<V>(cin(a.A) + d * NP + j * W);
            gAv[j] = gBf[j] = gCf[j] = V{};
          }
          const T *ur = cin(a.u) + bd * L, *dr = cin(a.dt) + bd * L, *gyr = cin(a.gy) + bd * L;
          const T *hr = cin(a.hs) + bd * (NC + 1) * NP;
          T *gur = out(a.gu) + bd * L, *gdr = out(a.gdt) + bd * L;
          for (int64_t c = NC - 1; c >= 0; --c) {
            const int64_t t0 = c * K, t1 = t0 + K < L ? t0 + K : L;
            V *hb = buf.h.data(), *ab = buf.a.data();
            for (int64_t j = 0; j < NV; ++j) hb[j] = load<V>(hr + c * NP + j * W);
            const T* Bt = bc(a.B, a.b_fixed, a.groups_b, b, d, t0);
            for (int64_t t = t0; t < t1; ++t, Bt += sB) {     // the chunk's states again
              const T dtt = dr[t], du = dtt * ur[t];
              const int64_t k = (t - t0) * NV;
              for (int64_t j = 0; j < NV; ++j) {
                ab[k + j] = vexp(dtt * Av[j]);
                hb[k + NV + j] = ab[k + j] * hb[k + j] + du * load<V>(Bt + j * W);
              }
            }
            Bt = bc(a.B, a.b_fixed, a.groups_b, b, d, t1 - 1);
            const T* Ct = bc(a.C, a.c_fixed, a.groups_c, b, d, t1 - 1);
            for (int64_t t = t1 - 1; t >= t0; --t, Bt -= sB, Ct -= sC) {
              const T dtt = dr[t], ut = ur[t], du = dtt * ut, gt = gyr[t];
              const int64_t k = (t - t0) * NV;
              V sb = V{}, sa = V{};
              for (int64_t j = 0; j < NV; ++j) {
                const V l = gt * load<V>(Ct + j * W) + lam[j];   // lam_t = C_t g_t + exp(dt_{t+1} A) lam_{t+1}
                const V gdA = l * hb[k + j] * ab[k + j];         // dloss/d(dt_t A) = lam_t x_{t-1} exp(dt_t A)
                gAv[j] += gdA * dtt;
                sb += l * load<V>(Bt + j * W);
                sa += gdA * Av[j];
                if (uB) store(uB + t * NP + j * W, load<V>(uB + t * NP + j * W) + l * du); else gBf[j] += l * du;
                if (uC) store(uC + t * NP + j * W, load<V>(uC + t * NP + j * W) + gt * hb[k + NV + j]);
                else gCf[j] += gt * hb[k + NV + j];
                lam[j] = ab[k + j] * l;
              }
              const T sbt = hsum<T>(sb);
              gur[t] = dtt * sbt;
              gdr[t] = hsum<T>(sa) + ut * sbt;
            }
          }
          for (int64_t j = 0; j < NV; ++j) {
            store(out(a.gh0) + bd * NP + j * W, lam[j]);
            store(out(a.gA) + bd * NP + j * W, gAv[j]);
            if (a.b_fixed) store(out(a.gB) + bd * NP + j * W, gBf[j]);
            if (a.c_fixed) store(out(a.gC) + bd * NP + j * W, gCf[j]);
          }
        }
    });
  }
};

template <typename T, int NVT> static bool run(const ScanArgs& a, bool fwd) {
  if (NVT && a.dstate != NVT * Vec<T>::W) return false;
  Scan<T, NVT> s(a);
  if (fwd) s.forward(); else s.backward();
  return true;
}

// 0 on success; 1: dstate is not a multiple of the vector width or above 16 vectors
template <typename T> static int dispatch(const ScanArgs* a, bool fwd) {
  if (a->dstate % Vec<T>::W || a->dstate > 16 * Vec<T>::W || a->dstate < 1) return 1;
  run<T, 1>(*a, fwd) || run<T, 2>(*a, fwd) || run<T, 4>(*a, fwd) || run<T, 0>(*a, fwd);
  return 0;
}

extern "C" {
int model_lab_scan_fwd_f32(const ScanArgs* a) { return dispatch<float>(a, true); }
int model_lab_scan_fwd_f64(const ScanArgs* a) { return dispatch<double>(a, true); }
int model_lab_scan_bwd_f32(const ScanArgs* a) { return dispatch<float>(a, false); }
int model_lab_scan_bwd_f64(const ScanArgs* a) { return dispatch<double>(a, false); }
int64_t model_lab_scan_abi() { return static_cast<int64_t>(sizeof(ScanArgs)); }  // checked against the ctypes layout
}
