// The selective scan's core on a CPU. model_lab.kernels.scan builds this file with torch.utils.cpp_extension.load
// and calls it through ctypes: no torch headers (they take ~25 s to compile; this file takes a few seconds).
//
// Per batch row b and channel d, over t = 0..L-1, with a state h of N lanes:
//   h = exp(dt_t A) * h + (dt_t u_t) B_t,   y_t = sum_n C_t h
// with dt_t = softplus(delta_t + delta_bias) (or without either), and the output (y_t + D u_t) silu(z_t): all fused
// here, forward and backward, so that no elementwise PyTorch operation runs around the call.
// Layouts (one scalar type; N padded with zeros to NP, a multiple of the vector width W):
//   u, delta, z, gy: (B, D, L) with any strides     y, gu, gdt, gz: contiguous (B, D, L)     A: (D, NP)
//   B, C: fixed (D, NP), or time-major (B, G, L, NP) with G groups of D/G channels
//   h0, glast: (B, D, NP)   hs: (B, D, NC + 1, NP): the state entering each chunk, then the last
//   gradients of the parameters and of B, C: in their own layouts, unpadded, summed here over batch rows and units
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
  int64_t b_fixed, c_fixed, has_h0, has_glast, softplus, nreal;  // nreal: N before padding to dstate
  int64_t su[3], sdt[3], sz[3], sgy[3];  // strides (batch, channel, step) of u, delta, z and the gradient of y
  const void *u, *dt, *A, *B, *C, *h0, *Dp, *z, *bias;  // dt: delta before the bias; Dp, z, bias may be null
  void *y, *hs;
  const void *gy, *glast;
  void *gu, *gdt, *gA, *gB, *gC, *gh0, *gz, *gD, *gbias;  // in the inputs' layouts, N unpadded; gh0 (B, D, N)
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

// log1p(e) on float lanes for e in [0, 1] (softplus): log(1 + e) e / ((1 + e) - 1), which keeps small e exact, with
// log on [1, 2] as k ln 2 + log(m), m in [sqrt(1/2), sqrt(2)], by Cephes' logf polynomial (relative error ~1e-7)
static inline Vec<float>::V vlog1p(Vec<float>::V e) {
  typedef Vec<float>::V V;
  const V one = V{} + 1.0f, y = one + e, big = V{} + 1.41421356f;
  const V k = y > big ? one : V{}, m = y > big ? y * 0.5f : y, f = m - one, z = f * f;
  V p = V{} + 7.0376836292e-2f;
  p = p * f - 1.1514610310e-1f; p = p * f + 1.1676998740e-1f; p = p * f - 1.2420140846e-1f;
  p = p * f + 1.4249322787e-1f; p = p * f - 1.6668057665e-1f; p = p * f + 2.0000714765e-1f;
  p = p * f - 2.4999993993e-1f; p = p * f + 3.3333331174e-1f;
  const V lg = f + (p * f * z - 0.5f * z) + k * 0.693147180559945f, d = y - one;
  return d == V{} ? e : lg * (e / (d == V{} ? one : d));
}
static inline Vec<double>::V vlog1p(Vec<double>::V e) {
  for (int i = 0; i < Vec<double>::W; ++i) e[i] = std::log1p(e[i]);
  return e;
}

// a horizontal sum by halving: 64 -> 32 -> 16 bytes, then lanes
template <typename T, typename V> static inline T hsum(const V& v) {
  typedef T H __attribute__((vector_size(32)));
  typedef T Q __attribute__((vector_size(16)));
  H lo, hi; std::memcpy(&lo, &v, 32); std::memcpy(&hi, reinterpret_cast<const char*>(&v) + 32, 32);
  const H s = lo + hi;
  Q a, b; std::memcpy(&a, &s, 16); std::memcpy(&b, reinterpret_cast<const char*>(&s) + 16, 16);
  const Q q = a + b;
  T r = 0;
  for (int i = 0; i < int(16 / sizeof(T)); ++i) r += q[i];
  return r;
}

// NVT > 0: NP / W known at compile time (the state stays in registers); NVT == 0: any NP up to 16 W
template <typename T, int NVT> struct Scan {
  typedef typename Vec<T>::V V;
  static constexpr int W = Vec<T>::W, NVMAX = NVT ? NVT : 16;
  const ScanArgs& a;
  const int64_t NP, NV, L, LP, D, NC, K;                   // LP: L rounded up to a whole vector
  explicit Scan(const ScanArgs& a) : a(a), NP(a.dstate), NV(NVT ? NVT : a.dstate / W), L(a.len),
                                     LP((a.len + W - 1) / W * W), D(a.dim), NC((a.len + a.chunk - 1) / a.chunk),
                                     K(a.chunk) {}
  // the row of B (or C) at step t for channel d of batch row b; a fixed one does not move with t
  const T* bc(const void* p, bool fixed, int64_t groups, int64_t b, int64_t d, int64_t t) const {
    if (fixed) return static_cast<const T*>(p) + d * NP;
    return static_cast<const T*>(p) + ((b * groups + d / (D / groups)) * L + t) * NP;
  }
  const T* cin(const void* p) const { return static_cast<const T*>(p); }
  T* out(void* p) const { return static_cast<T*>(p); }

  // one channel's sequence of a (B, D, L) input with strides s, copied into buf (LP entries, zero past L)
  void gather(const void* p, const int64_t* s, int64_t b, int64_t d, T* buf) const {
    const T* src = cin(p) + b * s[0] + d * s[1];
    if (s[2] == 1) std::memcpy(buf, src, L * sizeof(T));
    else for (int64_t t = 0; t < L; ++t) buf[t] = src[t * s[2]];
    for (int64_t t = L; t < LP; ++t) buf[t] = 0;
  }
  // delta + delta_bias -> dt in place, softplus(raw) = max(raw, 0) + log1p(exp(-|raw|)) when asked; sig (when not
  // null) gets its derivative sigmoid(raw)
  void prep_dt(int64_t d, T* dt, T* sig) const {
    const T bias = a.bias ? cin(a.bias)[d] : T(0);
    for (int64_t t = 0; t < LP; t += W) {
      V x = load<V>(dt + t) + bias;
      if (a.softplus) {
        const V zero = V{}, e = vexp(zero - (x < zero ? -x : x));
        if (sig) store(sig + t, (x < zero ? e : zero + T(1)) / (T(1) + e));
        x = (x > zero ? x : zero) + vlog1p(e);
      }
      store(dt + t, x);
    }
  }

  void forward() const {
    const int64_t sB = a.b_fixed ? 0 : NP, sC = a.c_fixed ? 0 : NP;
    parallel_for(a.batch * D, a.threads, [&] { return std::vector<T>(3 * LP); }, [&](int64_t bd, std::vector<T>& buf) {
      const int64_t b = bd / D, d = bd % D;
      T *dt = buf.data(), *ub = dt + LP, *yb = ub + LP;
      gather(a.dt, a.sdt, b, d, dt);
      prep_dt(d, dt, nullptr);
      gather(a.u, a.su, b, d, ub);
      V h[NVMAX], Av[NVMAX];
      for (int64_t j = 0; j < NV; ++j) {
        h[j] = a.has_h0 ? load<V>(cin(a.h0) + bd * NP + j * W) : V{};
        Av[j] = load<V>(cin(a.A) + d * NP + j * W);
      }
      const T *Bt = bc(a.B, a.b_fixed, a.groups_b, b, d, 0), *Ct = bc(a.C, a.c_fixed, a.groups_c, b, d, 0);
      T* hr = out(a.hs) + bd * (NC + 1) * NP;
      for (int64_t c = 0; c < NC; ++c) {
        for (int64_t j = 0; j < NV; ++j) store(hr + c * NP + j * W, h[j]);   // the state entering chunk c
        const int64_t t1 = (c + 1) * K < L ? (c + 1) * K : L;
        for (int64_t t = c * K; t < t1; ++t, Bt += sB, Ct += sC) {
          const T dtt = dt[t], du = dtt * ub[t];
          V acc = V{};
          for (int64_t j = 0; j < NV; ++j) {
            h[j] = vexp(dtt * Av[j]) * h[j] + du * load<V>(Bt + j * W);
            acc += h[j] * load<V>(Ct + j * W);
          }
          yb[t] = hsum<T>(acc);
        }
      }
      for (int64_t j = 0; j < NV; ++j) store(hr + NC * NP + j * W, h[j]);  // the last state
      const T Dd = a.Dp ? cin(a.Dp)[d] : T(0);                            // y + D u, times silu(z)
      if (a.z) gather(a.z, a.sz, b, d, dt);
      for (int64_t t = 0; t < LP; t += W) {
        V y = load<V>(yb + t) + Dd * load<V>(ub + t);
        if (a.z) { const V zv = load<V>(dt + t); y *= zv / (T(1) + vexp(V{} - zv)); }
        store(yb + t, y);
      }
      std::memcpy(out(a.y) + bd * L, yb, L * sizeof(T));
    });
  }

  void backward() const {
    const int64_t G = a.groups, P = a.parts, DG = D / G, units = a.batch * G * P;
    const int64_t sB = a.b_fixed ? 0 : NP, sC = a.c_fixed ? 0 : NP;
    const int64_t BD = a.batch * D, N = a.nreal;
    // per channel (B, D, NP): gA and a fixed B's or C's gradient; per unit (B, G, P, L, NP): a selective one's sums
    std::vector<T> lA(BD * NP), lB(a.b_fixed ? BD * NP : units * L * NP), lC(a.c_fixed ? BD * NP : units * L * NP);
    std::vector<T> lD(BD), lbias(BD);
    struct Buffers { std::vector<V> h, a; std::vector<T> s; };  // a chunk's states and exp(dt A); 5 sequences
    auto make = [&] { return Buffers{std::vector<V>((K + 1) * NV), std::vector<V>(K * NV), std::vector<T>(5 * LP)}; };
    parallel_for(units, a.threads, make, [&](int64_t unit, Buffers& buf) {
        const int64_t b = unit / (G * P), g = (unit / P) % G, p = unit % P, d0 = g * DG + p * DG / P;
        T *uB = a.b_fixed ? nullptr : lB.data() + unit * L * NP, *uC = a.c_fixed ? nullptr : lC.data() + unit * L * NP;
        for (int64_t d = d0; d < g * DG + (p + 1) * DG / P; ++d) {
          const int64_t bd = b * D + d;
          const bool first = d == d0;                   // the unit's first channel writes its B, C sums, the others add
          T *dt = buf.s.data(), *sg = dt + LP, *ub = sg + LP, *gb = ub + LP, *gq = gb + LP;
          gather(a.dt, a.sdt, b, d, dt);
          prep_dt(d, dt, sg);
          gather(a.u, a.su, b, d, ub);
          gather(a.gy, a.sgy, b, d, gb);
          if (a.z) {                                     // gb: dloss/dy before the gate; gq: gy silu'(z)
            gather(a.z, a.sz, b, d, gq);
            for (int64_t t = 0; t < LP; t += W) {
              const V zv = load<V>(gq + t), gv = load<V>(gb + t), s = T(1) / (T(1) + vexp(V{} - zv));
              store(gb + t, gv * zv * s);
              store(gq + t, gv * s * (T(1) + zv * (T(1) - s)));  // silu'(z) = s (1 + z (1 - s))
            }
          }
          const T Dd = a.Dp ? cin(a.Dp)[d] : T(0);
          T gDd = 0, gbd = 0;
          V lam[NVMAX], Av[NVMAX], gAv[NVMAX], gBf[NVMAX], gCf[NVMAX];
          for (int64_t j = 0; j < NV; ++j) {           // lam holds exp(dt_{t+1} A) lam_{t+1}
            lam[j] = a.has_glast ? load<V>(cin(a.glast) + bd * NP + j * W) : V{};
            Av[j] = load<V>(cin(a.A) + d * NP + j * W);
            gAv[j] = gBf[j] = gCf[j] = V{};
          }
          const T *hr = cin(a.hs) + bd * (NC + 1) * NP;
          T *gur = out(a.gu) + bd * L, *gdr = out(a.gdt) + bd * L, *gzr = a.z ? out(a.gz) + bd * L : nullptr;
          for (int64_t c = NC - 1; c >= 0; --c) {
            const int64_t t0 = c * K, t1 = t0 + K < L ? t0 + K : L;
            V *hb = buf.h.data(), *ab = buf.a.data();
            for (int64_t j = 0; j < NV; ++j) hb[j] = load<V>(hr + c * NP + j * W);
            const T* Bt = bc(a.B, a.b_fixed, a.groups_b, b, d, t0);
            for (int64_t t = t0; t < t1; ++t, Bt += sB) {     // the chunk's states again
              const T dtt = dt[t], du = dtt * ub[t];
              const int64_t k = (t - t0) * NV;
              for (int64_t j = 0; j < NV; ++j) {
                ab[k + j] = vexp(dtt * Av[j]);
                hb[k + NV + j] = ab[k + j] * hb[k + j] + du * load<V>(Bt + j * W);
              }
            }
            Bt = bc(a.B, a.b_fixed, a.groups_b, b, d, t1 - 1);
            const T* Ct = bc(a.C, a.c_fixed, a.groups_c, b, d, t1 - 1);
            for (int64_t t = t1 - 1; t >= t0; --t, Bt -= sB, Ct -= sC) {
              const T dtt = dt[t], ut = ub[t], du = dtt * ut, gt = gb[t];
              const int64_t k = (t - t0) * NV;
              V sb = V{}, sa = V{}, sy = V{};
              for (int64_t j = 0; j < NV; ++j) {
                const V Cv = load<V>(Ct + j * W), hv = hb[k + NV + j];
                const V l = gt * Cv + lam[j];                    // lam_t = C_t g_t + exp(dt_{t+1} A) lam_{t+1}
                const V gdA = l * hb[k + j] * ab[k + j];         // dloss/d(dt_t A) = lam_t x_{t-1} exp(dt_t A)
                gAv[j] += gdA * dtt;
                sb += l * load<V>(Bt + j * W);
                sa += gdA * Av[j];
                sy += Cv * hv;
                if (uB) store(uB + t * NP + j * W, first ? l * du : load<V>(uB + t * NP + j * W) + l * du);
                else gBf[j] += l * du;
                if (uC) store(uC + t * NP + j * W, first ? gt * hv : load<V>(uC + t * NP + j * W) + gt * hv);
                else gCf[j] += gt * hv;
                lam[j] = ab[k + j] * l;
              }
              const T sbt = hsum<T>(sb);
              T gd = hsum<T>(sa) + ut * sbt;
              if (a.softplus) gd *= sg[t];
              gur[t] = dtt * sbt + Dd * gt;
              gdr[t] = gd;
              gbd += gd;
              gDd += gt * ut;
              if (gzr) gzr[t] = gq[t] * (hsum<T>(sy) + Dd * ut);
            }
          }
          lD[bd] = gDd;
          lbias[bd] = gbd;
          for (int64_t j = 0; j < NV; ++j) {
            for (int64_t i = 0; i < W && j * W + i < N; ++i) out(a.gh0)[bd * N + j * W + i] = lam[j][i];
            store(lA.data() + bd * NP + j * W, gAv[j]);
            if (a.b_fixed) store(lB.data() + bd * NP + j * W, gBf[j]);
            if (a.c_fixed) store(lC.data() + bd * NP + j * W, gCf[j]);
          }
        }
    });
    // sums over the batch (parameters) and over the units that share a row of a selective B or C
    auto per_channel = [&](const std::vector<T>& l, int64_t width, int64_t stride, void* o) {
      for (int64_t d = 0; d < D; ++d)
        for (int64_t n = 0; n < width; ++n) {
          T s = 0;
          for (int64_t b = 0; b < a.batch; ++b) s += l[(b * D + d) * stride + n];
          out(o)[d * width + n] = s;
        }
    };
    per_channel(lA, N, NP, a.gA);
    if (a.gD) per_channel(lD, 1, 1, a.gD);
    if (a.gbias) per_channel(lbias, 1, 1, a.gbias);
    if (a.b_fixed) per_channel(lB, N, NP, a.gB); else gather_units(lB, a.groups_b, a.gB);
    if (a.c_fixed) per_channel(lC, N, NP, a.gC); else gather_units(lC, a.groups_c, a.gC);
  }

  // o (B, GX, N, L) = the per-unit sums u (B, G, P, L, NP), summed over P and over the G / GX groups in each of o's
  void gather_units(const std::vector<T>& u, int64_t GX, void* o) const {
    const int64_t G = a.groups, P = a.parts, N = a.nreal, TB = 64, nb = (L + TB - 1) / TB;
    parallel_for(a.batch * GX * nb, a.threads, [] { return NoState{}; }, [&](int64_t item, NoState&) {
      const int64_t b = item / (GX * nb), gx = (item / nb) % GX, t0 = (item % nb) * TB, t1 = std::min(L, t0 + TB);
      T* ob = out(o) + (b * GX + gx) * N * L;
      for (int64_t t = t0; t < t1; ++t) {
        V s[NVMAX];
        for (int64_t j = 0; j < NV; ++j) s[j] = V{};
        for (int64_t k = gx * (G / GX); k < (gx + 1) * (G / GX); ++k)
          for (int64_t p = 0; p < P; ++p) {
            const T* r = u.data() + (((b * G + k) * P + p) * L + t) * NP;
            for (int64_t j = 0; j < NV; ++j) s[j] += load<V>(r + j * W);
          }
        for (int64_t j = 0; j < NV; ++j)
          for (int64_t i = 0; i < W && j * W + i < N; ++i) ob[(j * W + i) * L + t] = s[j][i];
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
