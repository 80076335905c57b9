// Allocate/free pairs per second of the caching allocator core against malloc/free, on the
// two traces of benchmarks/bench_alloc.py (random sizes; LLM-decoding shaped). Torch-free,
// so the core's hot path can be profiled alone (perf record ./bench_alloc_core).
#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <functional>
#include <random>
#include <vector>

#include "core/alloc/backend.h"
#include "core/alloc/caching_allocator.h"

namespace ma = memwarden::alloc;

namespace {

struct Trace {
  std::vector<long> ops;  // slot >= 0 allocates sizes[slot]; -slot-1 frees it
  std::vector<std::size_t> sizes;
};

Trace random_trace(std::size_t n_allocs, std::size_t max_size, std::size_t max_live) {
  std::mt19937_64 rng(0);
  Trace t;
  std::vector<long> live;
  std::size_t live_bytes = 0;
  while (t.sizes.size() < n_allocs) {
    const std::size_t size = std::uniform_int_distribution<std::size_t>(1, max_size)(rng);
    if (!live.empty() && (rng() % 2 == 0 || live_bytes + size > max_live)) {
      const std::size_t i = rng() % live.size();
      const long slot = live[i];
      live[i] = live.back();
      live.pop_back();
      live_bytes -= t.sizes[static_cast<std::size_t>(slot)];
      t.ops.push_back(-slot - 1);
      continue;
    }
    t.sizes.push_back(size);
    live.push_back(static_cast<long>(t.sizes.size() - 1));
    live_bytes += size;
    t.ops.push_back(live.back());
  }
  std::shuffle(live.begin(), live.end(), rng);
  for (long s : live) t.ops.push_back(-s - 1);
  return t;
}

Trace llm_trace(int steps) {
  const std::size_t layers = 8, hidden = 2048, heads = 16, kv_heads = 4, batch = 4, seq_len = 128, elem = 2;
  const std::size_t head_dim = hidden / heads;
  Trace t;
  auto alloc = [&t](std::size_t n) {
    t.sizes.push_back(n);
    t.ops.push_back(static_cast<long>(t.sizes.size() - 1));
    return t.ops.back();
  };
  auto free_slot = [&t](long s) { t.ops.push_back(-s - 1); };
  std::vector<std::vector<long>> kv(layers);
  long h = -1;
  for (int step = 0; step < steps; ++step) {
    const std::size_t ctx = static_cast<std::size_t>(step) % seq_len + 1;
    if (ctx == 1)
      for (auto& layer : kv) {
        for (long s : layer) free_slot(s);
        layer.clear();
      }
    const long h_prev = h;
    h = alloc(batch * hidden * elem);
    if (h_prev >= 0) free_slot(h_prev);
    for (std::size_t layer = 0; layer < layers; ++layer) {
      std::vector<long> tmp{alloc(batch * hidden * elem), alloc(batch * (hidden + 2 * kv_heads * head_dim) * elem)};
      std::vector<long> new_kv{alloc(batch * kv_heads * ctx * head_dim * elem),
                               alloc(batch * kv_heads * ctx * head_dim * elem)};
      for (long s : kv[layer]) free_slot(s);
      kv[layer] = new_kv;
      tmp.push_back(alloc(batch * heads * ctx * 4));
      tmp.push_back(alloc(batch * heads * ctx * elem));
      tmp.push_back(alloc(batch * hidden * elem));
      tmp.push_back(alloc(batch * 4 * hidden * elem));
      tmp.push_back(alloc(batch * 4 * hidden * elem));
      const long h2 = alloc(batch * hidden * elem);
      for (long s : tmp) free_slot(s);
      free_slot(h);
      h = h2;
    }
    free_slot(alloc(batch * 32000 * 4));
  }
  free_slot(h);
  for (auto& layer : kv)
    for (long s : layer) free_slot(s);
  return t;
}

template <class Alloc, class Free>
double seconds(const Trace& t, Alloc&& alloc, Free&& release) {
  std::vector<void*> slots(t.sizes.size(), nullptr);
  const auto start = std::chrono::steady_clock::now();
  for (long op : t.ops) {
    if (op >= 0) slots[static_cast<std::size_t>(op)] = alloc(t.sizes[static_cast<std::size_t>(op)]);
    else release(slots[static_cast<std::size_t>(-op - 1)]);
  }
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

double median_rate(const Trace& t, int repeats, const std::function<double()>& run) {
  run();  // warm up
  std::vector<double> rates;
  for (int i = 0; i < repeats; ++i) rates.push_back(static_cast<double>(t.sizes.size()) / run());
  std::sort(rates.begin(), rates.end());
  return rates[rates.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const int repeats = argc > 1 ? std::atoi(argv[1]) : 7;
  const std::size_t MiB = 1 << 20;
  ma::CachingAllocator mw(std::make_shared<ma::HostBackend>());
  const std::pair<const char*, Trace> traces[] = {{"random", random_trace(50000, 4 * MiB, 512 * MiB)},
                                                 {"llm", llm_trace(256)}};
  for (const auto& [name, t] : traces) {
    const double libc = median_rate(t, repeats, [&t] {
      return seconds(t, [](std::size_t n) { return std::malloc(n); }, [](void* p) { std::free(p); });
    });
    const double cached = median_rate(t, repeats, [&t, &mw] {
      return seconds(t, [&mw](std::size_t n) { return mw.allocate(n); }, [&mw](void* p) { mw.deallocate(p); });
    });
    std::printf("%-7s allocations/s: malloc %12.0f   memwarden %12.0f   x%.2f   (%.0f ns per pair)\n", name, libc,
                cached, cached / libc, 1e9 / cached);
  }
}
