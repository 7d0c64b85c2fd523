// Where the CPU fused kernel's time goes: small single-thread probes behind the analysis in
// docs/benchmarks.md (AVX2 + FMA; x86-64 only). Build against torch's bundled SLEEF:
//
//   T=$(python -c "import torch, os; print(os.path.dirname(torch.__file__))")
//   g++ -O3 -mavx2 -mfma -I$T/include benchmarks/cpu_probe.cpp -L$T/lib -ltorch_cpu -lc10 \
//       -Wl,-rpath,$T/lib -o /tmp/cpu_probe
//   /tmp/cpu_probe stream 64 1000000   # passes over G [B, P] from memory (cache flushed before each)
//   /tmp/cpu_probe cache 1000000       # acc += c·row with the row and acc already in cache
//   /tmp/cpu_probe normals             # ns per normal: Philox, + Box-Muller (8 blocks at a time)
//
// Each line is the median of 7 runs. GB/s counts the bytes of G read once (B·P·4).
#include <immintrin.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../csrc/philox_avx2.h"

namespace {

double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

std::vector<float> flush_buffer(16 * 1024 * 1024);  // 64 MB > the last-level cache
void flush() {
  for (size_t i = 0; i < flush_buffer.size(); i += 16) flush_buffer[i] += 1.0f;
}

template <typename F>
double median_seconds(F fn, bool flushed) {
  std::vector<double> t;
  for (int rep = 0; rep < 7; ++rep) {
    if (flushed) flush();
    const double t0 = now();
    fn();
    t.push_back(now() - t0);
  }
  std::sort(t.begin(), t.end());
  return t[3];
}

inline void add_squares(__m256 u, __m256d& a0, __m256d& a1) {
  const __m256d lo = _mm256_cvtps_pd(_mm256_castps256_ps128(u)), hi = _mm256_cvtps_pd(_mm256_extractf128_ps(u, 1));
  a0 = _mm256_fmadd_pd(lo, lo, a0);
  a1 = _mm256_fmadd_pd(hi, hi, a1);
}
double hsum(__m256d a) {
  double t[4];
  _mm256_storeu_pd(t, a);
  return t[0] + t[1] + t[2] + t[3];
}

// Σ x² in float64 over n (a multiple of 16) floats.
__attribute__((noinline)) double sum_squares(const float* x, int64_t n) {
  __m256d a0 = _mm256_setzero_pd(), a1 = a0, b0 = a0, b1 = a0;
  for (int64_t i = 0; i < n; i += 16) {
    add_squares(_mm256_loadu_ps(x + i), a0, a1);
    add_squares(_mm256_loadu_ps(x + i + 8), b0, b1);
  }
  return hsum(_mm256_add_pd(_mm256_add_pd(a0, a1), _mm256_add_pd(b0, b1)));
}

// acc[0:n] += Σ_{k<R} c[k]·x[k·stride + 0:n] (n a multiple of 8).
template <int R>
__attribute__((noinline)) void accumulate(float* acc, const float* x, int64_t stride, int64_t n, const float* c) {
  __m256 cv[R];
  for (int k = 0; k < R; ++k) cv[k] = _mm256_set1_ps(c[k]);
  for (int64_t i = 0; i < n; i += 8) {
    __m256 a = _mm256_loadu_ps(acc + i);
    for (int k = 0; k < R; ++k) a = _mm256_fmadd_ps(cv[k], _mm256_loadu_ps(x + k * stride + i), a);
    _mm256_storeu_ps(acc + i, a);
  }
}

// One sweep: squares of NN rows `next` and acc += Σ c·rows `cur` (NC rows), interleaved.
template <int NN, int NC>
__attribute__((noinline)) void mixed_sweep(float* acc, const float* cur, const float* next, int64_t P,
                                           const float* c, double* ss) {
  __m256d s0[NN > 0 ? NN : 1], s1[NN > 0 ? NN : 1];
  for (int k = 0; k < NN; ++k) s0[k] = s1[k] = _mm256_setzero_pd();
  __m256 cv[NC > 0 ? NC : 1];
  for (int k = 0; k < NC; ++k) cv[k] = _mm256_set1_ps(c[k]);
  for (int64_t i = 0; i < P; i += 8) {
    for (int k = 0; k < NN; ++k) add_squares(_mm256_loadu_ps(next + k * P + i), s0[k], s1[k]);
    if constexpr (NC > 0) {
      __m256 a = _mm256_loadu_ps(acc + i);
      for (int k = 0; k < NC; ++k) a = _mm256_fmadd_ps(cv[k], _mm256_loadu_ps(cur + k * P + i), a);
      _mm256_storeu_ps(acc + i, a);
    }
  }
  for (int k = 0; k < NN; ++k) ss[k] = hsum(_mm256_add_pd(s0[k], s1[k]));
}

void report(const char* what, double seconds, double bytes) {
  std::printf("  %-58s %9.3f ms %7.1f GB/s\n", what, seconds * 1e3, bytes / seconds / 1e9);
}

void stream(int64_t B, int64_t P) {
  P -= P % 64;
  std::vector<float> G(static_cast<size_t>(B * P)), acc(static_cast<size_t>(P)), c(static_cast<size_t>(B), 0.3f);
  for (size_t i = 0; i < G.size(); ++i) G[i] = static_cast<float>((i * 2654435761u) % 1000) / 1000.0f - 0.5f;
  std::vector<double> ss(static_cast<size_t>(B));
  const double bytes = 4.0 * B * P;
  std::printf("B=%ld P=%ld (G %.0f MB), one thread, cache flushed before each run\n", B, P, bytes / 1e6);
  report("norm pass: whole rows, float64 squares", median_seconds([&] {
    for (int64_t r = 0; r < B; ++r) ss[r] = sum_squares(&G[r * P], P);
  }, true), bytes);
  for (int64_t chunk : {2048L, 16384L, 65536L}) {
    const std::string what = "accumulate pass: column chunks of " + std::to_string(chunk) + ", 4 rows a sweep";
    report(what.c_str(), median_seconds([&] {
      for (int64_t c0 = 0; c0 < P; c0 += chunk) {
        const int64_t n = std::min(chunk, P - c0);
        std::memset(&acc[c0], 0, 4 * n);
        for (int64_t r = 0; r + 4 <= B; r += 4) accumulate<4>(&acc[c0], &G[r * P + c0], P, n, &c[r]);
      }
    }, true), bytes);
  }
  report("one read: groups of 4 rows (norms, then accumulate from cache)", median_seconds([&] {
    std::memset(acc.data(), 0, 4 * P);
    for (int64_t r = 0; r + 4 <= B; r += 4) {
      for (int k = 0; k < 4; ++k) ss[r + k] = sum_squares(&G[(r + k) * P], P);
      accumulate<4>(acc.data(), &G[r * P], P, P, &c[r]);
    }
  }, true), bytes);
  report("one read, pipelined: norms of rows r+1 while accumulating r", median_seconds([&] {
    std::memset(acc.data(), 0, 4 * P);
    mixed_sweep<1, 0>(acc.data(), nullptr, G.data(), P, c.data(), ss.data());
    for (int64_t r = 0; r + 1 < B; ++r) mixed_sweep<1, 1>(acc.data(), &G[r * P], &G[(r + 1) * P], P, &c[r], &ss[r + 1]);
    mixed_sweep<0, 1>(acc.data(), &G[(B - 1) * P], nullptr, P, &c[B - 1], nullptr);
  }, true), bytes);
  std::vector<float> dst(G.size());
  report("copy (memcpy of G; GB/s of G read)", median_seconds([&] { std::memcpy(dst.data(), G.data(), 4 * G.size()); },
                                                              true), bytes);
}

void cache(int64_t P) {
  P -= P % 64;
  std::vector<float> rows(static_cast<size_t>(4 * P), 1.0f), acc(static_cast<size_t>(P), 0.0f);
  const float c[4] = {0.5f, 0.5f, 0.5f, 0.5f};
  std::printf("P=%ld: accumulate with everything already in cache (warm), one thread\n", P);
  accumulate<1>(acc.data(), rows.data(), P, P, c);
  const double t1 = median_seconds([&] { accumulate<1>(acc.data(), rows.data(), P, P, c); }, false);
  std::printf("  acc += c*row (row + acc = %.1f MB): %.3f ms per row, %.1f GB/s read + written\n", 8.0 * P / 1e6,
              t1 * 1e3, 12.0 * P / t1 / 1e9);
  accumulate<4>(acc.data(), rows.data(), P, P, c);
  const double t4 = median_seconds([&] { accumulate<4>(acc.data(), rows.data(), P, P, c); }, false);
  std::printf("  acc += sum of 4 rows (%.1f MB): %.3f ms per row\n", 20.0 * P / 1e6, t4 * 1e3 / 4);
}

void normals() {
  std::vector<float> out(1 << 20);
  std::printf("%zu normals, one thread (csrc/philox_avx2.h)\n", out.size());
  const double philox = median_seconds([&] {
    for (size_t j = 0; j < out.size(); j += 32) {
      __m256i x[4];
      demem::philox8(j / 4, 7, x);
      for (int l = 0; l < 4; ++l) _mm256_storeu_si256(reinterpret_cast<__m256i*>(&out[j + 8 * l]), x[l]);
    }
  }, false);
  const double normal = median_seconds([&] {
    for (size_t j = 0; j < out.size(); j += 32) demem::philox_normal32(j / 4, 7, &out[j]);
  }, false);
  std::printf("  %-44s %.2f ns per normal\n", "Philox4x32-10 (8 blocks per AVX2 vector)", philox / out.size() * 1e9);
  std::printf("  %-44s %.2f ns per normal\n", "+ Box-Muller (SLEEF log, sincos)", normal / out.size() * 1e9);
}

}  // namespace

int main(int argc, char** argv) {
  const std::string mode = argc > 1 ? argv[1] : "";
  if (mode == "stream" && argc == 4) {
    stream(std::atol(argv[2]), std::atol(argv[3]));
  } else if (mode == "cache" && argc == 3) {
    cache(std::atol(argv[2]));
  } else if (mode == "normals") {
    normals();
  } else {
    std::fprintf(stderr, "usage: cpu_probe stream B P | cache P | normals\n");
    return 2;
  }
  return 0;
}
