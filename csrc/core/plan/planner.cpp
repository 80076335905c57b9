#include "core/plan/planner.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <stdexcept>
#include <string>

namespace memwarden::plan {
namespace {

struct Score {
  int64_t overflow = std::numeric_limits<int64_t>::max();
  double spread = std::numeric_limits<double>::infinity();
  bool better_than(const Score& o) const {
    if (overflow != o.overflow) return overflow < o.overflow;
    return spread < o.spread - 1e-6;
  }
};

void validate(const std::vector<Item>& items, const std::vector<Device>& devices) {
  if (devices.empty()) throw std::invalid_argument("devices: at least one device is needed");
  for (size_t d = 0; d < devices.size(); ++d)
    if (devices[d].capacity < 0)
      throw std::invalid_argument("devices[" + std::to_string(d) + "].capacity must be >= 0, got " +
                                  std::to_string(devices[d].capacity));
  for (size_t i = 0; i < items.size(); ++i)
    if (items[i].bytes < 0)
      throw std::invalid_argument("items[" + std::to_string(i) + "].bytes must be >= 0, got " +
                                  std::to_string(items[i].bytes));
}

// Shared state of one planning problem.
class Problem {
 public:
  Problem(const std::vector<Item>& items, const std::vector<Device>& devices, const Options& opt)
      : items_(items), devices_(devices), opt_(opt), D_(static_cast<int>(devices.size())) {
    total_ = 0;
    for (const auto& it : items_) total_ += it.bytes;
    cap_total_ = 0;
    for (const auto& d : devices_) cap_total_ += d.capacity;
    compute_targets();
    int64_t dense_total = 0;
    for (size_t i = 0; i < items_.size(); ++i) {
      if (items_[i].free) {
        free_.push_back(static_cast<int32_t>(i));
      } else {
        dense_.push_back(static_cast<int32_t>(i));
        dense_total += items_[i].bytes;
      }
    }
    // The pipeline runs over the accelerators that get a share; spill devices join it
    // only when the pipeline items alone do not fit on the accelerators (otherwise
    // they take experts only, and the head stays on the last accelerator).
    int64_t acc_cap = 0;
    for (int d = 0; d < D_; ++d)
      if (!devices_[d].spill) {
        acc_cap += devices_[d].capacity;
        if (target_[d] > 0) pipe_.push_back(d);
      }
    if (dense_total > acc_cap || pipe_.empty())
      for (int d = 0; d < D_; ++d)
        if (devices_[d].spill && target_[d] > 0) pipe_.push_back(d);
    if (pipe_.empty()) pipe_.push_back(first_accelerator());
    // Home of each layer: the index (into dense_) of the last pipeline item of that layer.
    for (size_t k = 0; k < dense_.size(); ++k) home_dense_[items_[dense_[k]].layer] = static_cast<int32_t>(k);
    free_home_.resize(free_.size(), -1);
    for (size_t f = 0; f < free_.size(); ++f) {
      const int32_t layer = items_[free_[f]].layer;
      auto it = home_dense_.upper_bound(layer);  // last layer <= this one
      if (it != home_dense_.begin()) free_home_[f] = std::prev(it)->second;
      else if (!home_dense_.empty()) free_home_[f] = home_dense_.begin()->second;
    }
    std::vector<int64_t> sizes;
    for (int32_t i : free_) sizes.push_back(items_[i].bytes);
    std::sort(sizes.begin(), sizes.end());
    sizes.erase(std::unique(sizes.begin(), sizes.end()), sizes.end());
    class_bytes_ = sizes;
    free_class_.resize(free_.size());
    for (size_t f = 0; f < free_.size(); ++f)
      free_class_[f] = static_cast<int32_t>(std::lower_bound(sizes.begin(), sizes.end(), items_[free_[f]].bytes) - sizes.begin());
    by_size_.resize(free_.size());
    std::iota(by_size_.begin(), by_size_.end(), 0);
    std::stable_sort(by_size_.begin(), by_size_.end(), [&](int32_t a, int32_t b) {
      return items_[free_[a]].bytes > items_[free_[b]].bytes;
    });
  }

  int64_t total() const { return total_; }
  int64_t cap_total() const { return cap_total_; }
  const std::vector<double>& target() const { return target_; }
  int num_dense() const { return static_cast<int>(dense_.size()); }
  int num_pipe() const { return static_cast<int>(pipe_.size()); }
  int num_free() const { return static_cast<int>(free_.size()); }

  // Cut points b[0..P]: pipeline device p takes dense_[b[p] .. b[p+1]).
  bool valid_cuts(const std::vector<int>& b) const {
    const int n = num_dense(), P = num_pipe();
    if (b.front() != 0 || b.back() != n) return false;
    for (int p = 0; p < P; ++p)
      if (b[p] > b[p + 1]) return false;
    if (n >= 1 && P >= 2 && b[1] < 1) return false;              // first item on the first device
    if (n >= 2 && P >= 2 && b[P - 1] > n - 1) return false;      // last item on the last device
    return true;
  }

  // Cut the line of all items (experts right after their layer) at the cumulative
  // targets. unit_layers: whole layers are atomic (the baseline); otherwise items are.
  std::vector<int32_t> line_cut(bool unit_layers) const {
    // Build the line: dense items in order, each layer's experts after its last dense item.
    std::map<int32_t, std::vector<int32_t>> bucket;  // layer -> free items
    for (size_t f = 0; f < free_.size(); ++f) bucket[items_[free_[f]].layer].push_back(free_[f]);
    std::vector<int32_t> line;
    line.reserve(items_.size());
    std::vector<int32_t> unit;  // unit id per line position
    int32_t unit_id = -1;
    for (size_t k = 0; k < dense_.size(); ++k) {
      const int32_t layer = items_[dense_[k]].layer;
      if (k == 0 || items_[dense_[k - 1]].layer != layer) ++unit_id;
      line.push_back(dense_[k]);
      unit.push_back(unit_id);
      const bool layer_end = k + 1 == dense_.size() || items_[dense_[k + 1]].layer != layer;
      if (layer_end) {
        while (!bucket.empty() && bucket.begin()->first <= layer) {
          for (int32_t i : bucket.begin()->second) {
            line.push_back(i);
            unit.push_back(unit_id);
          }
          bucket.erase(bucket.begin());
        }
      }
    }
    for (auto& [layer, v] : bucket) {
      ++unit_id;
      for (int32_t i : v) {
        line.push_back(i);
        unit.push_back(unit_id);
      }
    }
    // Units and their sizes.
    std::vector<int64_t> unit_bytes(unit_id + 1, 0);
    for (size_t j = 0; j < line.size(); ++j) unit_bytes[unit[j]] += items_[line[j]].bytes;
    std::vector<int32_t> assign(items_.size(), pipe_.front());
    const int P = num_pipe();
    int p = 0;
    double cum_target = target_[pipe_[0]];
    int64_t cum = 0;
    size_t j = 0;
    while (j < line.size()) {
      size_t end = j + 1;
      int64_t bytes = items_[line[j]].bytes;
      if (unit_layers) {
        bytes = unit_bytes[unit[j]];
        while (end < line.size() && unit[end] == unit[j]) ++end;
      }
      while (p + 1 < P && static_cast<double>(cum) + 0.5 * static_cast<double>(bytes) > cum_target) {
        ++p;
        cum_target += target_[pipe_[p]];
      }
      for (size_t q = j; q < end; ++q) assign[line[q]] = pipe_[p];
      cum += bytes;
      j = end;
    }
    return assign;
  }

  // Cut points minimising max_p |dense_p - target_p| (pipeline items only; a run over
  // its device's capacity is not allowed unless nothing else is). O(P n^2).
  std::vector<int> dp_cuts() const {
    const int n = num_dense(), P = num_pipe();
    std::vector<int64_t> pre(n + 1, 0);
    for (int k = 0; k < n; ++k) pre[k + 1] = pre[k] + items_[dense_[k]].bytes;
    const double inf = std::numeric_limits<double>::infinity();
    std::vector<std::vector<double>> cost(P + 1, std::vector<double>(n + 1, inf));
    std::vector<std::vector<int>> from(P + 1, std::vector<int>(n + 1, 0));
    cost[0][0] = 0;
    for (int p = 0; p < P; ++p) {
      const int d = pipe_[p];
      const double cap = static_cast<double>(devices_[d].capacity);
      for (int k = 0; k <= n; ++k) {
        if (p + 1 == P && k != n) continue;
        if (P >= 2 && p == 0 && n >= 1 && k < 1) continue;
        if (P >= 2 && p + 1 == P - 1 && n >= 2 && k > n - 1) continue;
        for (int j = 0; j <= k; ++j) {
          if (cost[p][j] == inf) continue;
          const double run = static_cast<double>(pre[k] - pre[j]);
          double c = std::fabs(run - target_[d]);
          if (run > cap) c += 1e30;  // strongly discouraged, still ordered
          c = std::max(c, cost[p][j]);
          if (c < cost[p + 1][k]) {
            cost[p + 1][k] = c;
            from[p + 1][k] = j;
          }
        }
      }
    }
    std::vector<int> b(P + 1, n);
    if (cost[P][n] == inf) return cuts_of(line_cut(false));
    for (int p = P; p > 0; --p) b[p - 1] = from[p][b[p]];
    return b;
  }

  // Cut points implied by an assignment of the dense items (clamped to be valid).
  std::vector<int> cuts_of(const std::vector<int32_t>& assign) const {
    const int n = num_dense(), P = num_pipe();
    std::vector<int> pos_of(D_, -1);
    for (int p = 0; p < P; ++p) pos_of[pipe_[p]] = p;
    std::vector<int> b(P + 1, 0);
    std::vector<int> count(P, 0);
    for (int k = 0; k < n; ++k) {
      int p = pos_of[assign[dense_[k]]];
      if (p < 0) p = 0;
      ++count[p];
    }
    for (int p = 0; p < P; ++p) b[p + 1] = b[p] + count[p];
    if (P >= 2 && n >= 1 && b[1] < 1) b[1] = 1;
    for (int p = 1; p < P; ++p) b[p] = std::max(b[p], b[p - 1]);
    if (P >= 2 && n >= 2 && b[P - 1] > n - 1) b[P - 1] = n - 1;
    for (int p = P - 1; p >= 1; --p) b[p] = std::min(b[p], b[p + 1]);
    b[P] = n;
    return b;
  }

  Score score(const std::vector<int64_t>& load) const {
    Score s;
    s.overflow = 0;
    double lo = std::numeric_limits<double>::infinity(), hi = -lo;
    for (int d = 0; d < D_; ++d) {
      s.overflow += std::max<int64_t>(0, load[d] - devices_[d].capacity);
      const double dev = static_cast<double>(load[d]) - target_[d];
      lo = std::min(lo, dev);
      hi = std::max(hi, dev);
    }
    s.spread = hi - lo;
    return s;
  }

  Score evaluate_assignment(const std::vector<int32_t>& assign, std::vector<int64_t>* load_out) const {
    std::vector<int64_t> load(D_, 0);
    for (size_t i = 0; i < items_.size(); ++i) load[assign[i]] += items_[i].bytes;
    if (load_out) *load_out = load;
    return score(load);
  }

  // Places the dense items by cut points, then fills the experts. Writes assign/load.
  Score fill(const std::vector<int>& b, std::vector<int32_t>& assign, std::vector<int64_t>& load) const {
    const int P = num_pipe();
    assign.assign(items_.size(), -1);
    load.assign(D_, 0);
    std::vector<int32_t> dense_dev(dense_.size());
    for (int p = 0; p < P; ++p)
      for (int k = b[p]; k < b[p + 1]; ++k) {
        dense_dev[k] = pipe_[p];
        assign[dense_[k]] = pipe_[p];
        load[pipe_[p]] += items_[dense_[k]].bytes;
      }
    const auto fits = [&](int d, int64_t x) { return load[d] + x <= devices_[d].capacity; };
    // 1. experts onto their own layer's device, up to its target
    std::vector<char> placed(free_.size(), 0);
    if (opt_.locality && !dense_.empty()) {
      for (size_t f = 0; f < free_.size(); ++f) {
        const int h = free_home_[f] < 0 ? -1 : dense_dev[free_home_[f]];
        if (h < 0) continue;
        const int64_t x = items_[free_[f]].bytes;
        if (static_cast<double>(load[h] + x) <= target_[h] && fits(h, x)) {
          assign[free_[f]] = h;
          load[h] += x;
          placed[f] = 1;
        }
      }
    }
    // 2. the rest largest first onto the device furthest below its target
    for (int32_t f : by_size_) {
      if (placed[f]) continue;
      const int64_t x = items_[free_[f]].bytes;
      int best = -1;
      double best_room = -std::numeric_limits<double>::infinity();
      for (int d = 0; d < D_; ++d) {
        if (!fits(d, x)) continue;
        const double room = target_[d] - static_cast<double>(load[d]);
        if (room > best_room + 1e-9) {
          best_room = room;
          best = d;
        }
      }
      if (best < 0) {  // fits nowhere: the device with the most free capacity takes the overflow
        int64_t most = std::numeric_limits<int64_t>::min();
        for (int d = 0; d < D_; ++d)
          if (devices_[d].capacity - load[d] > most) {
            most = devices_[d].capacity - load[d];
            best = d;
          }
      }
      assign[free_[f]] = best;
      load[best] += x;
    }
    refine(assign, load);
    return score(load);
  }

  // Moves and swaps of experts between the devices furthest above and below target.
  void refine(std::vector<int32_t>& assign, std::vector<int64_t>& load) const {
    if (free_.empty()) return;
    const int C = static_cast<int>(class_bytes_.size());
    // per device and size class: the free items held (a stack; the last one moves first)
    std::vector<std::vector<int32_t>> held(static_cast<size_t>(D_) * C);
    for (size_t f = 0; f < free_.size(); ++f) held[assign[free_[f]] * C + free_class_[f]].push_back(free_[f]);
    const int max_iter = 8 * D_ + 16;
    for (int iter = 0; iter < max_iter; ++iter) {
      int hi = -1, lo = -1;
      double dhi = -std::numeric_limits<double>::infinity(), dlo = std::numeric_limits<double>::infinity();
      for (int d = 0; d < D_; ++d) {
        const double dev = static_cast<double>(load[d]) - target_[d];
        if (dev > dhi) { dhi = dev; hi = d; }
        if (dev < dlo) { dlo = dev; lo = d; }
      }
      const double gap = dhi - dlo;
      if (hi == lo || gap <= 0) return;
      // best delta in (0, gap): a move of size a, or a swap a (hi->lo) / c (lo->hi), delta a-c
      double best_err = gap;  // |gap - 2*delta| must beat gap
      int best_a = -1, best_c = -1;
      for (int ca = 0; ca < C; ++ca) {
        if (held[hi * C + ca].empty()) continue;
        const int64_t a = class_bytes_[ca];
        const double da = static_cast<double>(a);
        if (da > 0 && da < gap && load[lo] + a <= devices_[lo].capacity) {
          const double err = std::fabs(gap - 2 * da);
          if (err < best_err - 1e-9) { best_err = err; best_a = ca; best_c = -1; }
        }
        for (int cc = 0; cc < ca; ++cc) {
          if (held[lo * C + cc].empty()) continue;
          const int64_t c = class_bytes_[cc];
          const double delta = static_cast<double>(a - c);
          if (delta >= gap || load[lo] + a - c > devices_[lo].capacity) continue;
          const double err = std::fabs(gap - 2 * delta);
          if (err < best_err - 1e-9) { best_err = err; best_a = ca; best_c = cc; }
        }
      }
      if (best_a < 0) return;
      const int32_t ia = held[hi * C + best_a].back();
      held[hi * C + best_a].pop_back();
      held[lo * C + best_a].push_back(ia);
      assign[ia] = lo;
      load[hi] -= class_bytes_[best_a];
      load[lo] += class_bytes_[best_a];
      if (best_c >= 0) {
        const int32_t ic = held[lo * C + best_c].back();
        held[lo * C + best_c].pop_back();
        held[hi * C + best_c].push_back(ic);
        assign[ic] = hi;
        load[lo] -= class_bytes_[best_c];
        load[hi] += class_bytes_[best_c];
      }
    }
  }

  double target_of(int d) const { return target_[d]; }

 private:
  int first_accelerator() const {
    for (int d = 0; d < D_; ++d)
      if (!devices_[d].spill) return d;
    return 0;
  }

  void compute_targets() {
    target_.assign(D_, 0.0);
    std::vector<int> acc;
    int64_t acc_cap = 0;
    for (int d = 0; d < D_; ++d)
      if (!devices_[d].spill) {
        acc.push_back(d);
        acc_cap += devices_[d].capacity;
      }
    const double on_acc = static_cast<double>(std::min(total_, acc_cap));
    if (!acc.empty() && on_acc > 0) {
      if (opt_.balance == Balance::Capacity) {
        for (int d : acc) target_[d] = on_acc * static_cast<double>(devices_[d].capacity) / static_cast<double>(acc_cap);
      } else {  // water filling
        std::vector<int> order = acc;
        std::stable_sort(order.begin(), order.end(),
                         [&](int a, int b) { return devices_[a].capacity < devices_[b].capacity; });
        double left = on_acc;
        size_t k = 0;
        while (k < order.size()) {
          const double share = left / static_cast<double>(order.size() - k);
          const double cap = static_cast<double>(devices_[order[k]].capacity);
          if (cap <= share) {
            target_[order[k]] = cap;
            left -= cap;
            ++k;
          } else {
            for (size_t q = k; q < order.size(); ++q) target_[order[q]] = share;
            break;
          }
        }
      }
    }
    double rest = static_cast<double>(total_) - on_acc;
    for (int d = 0; d < D_ && rest > 0; ++d) {
      if (!devices_[d].spill) continue;
      const double take = std::min(rest, static_cast<double>(devices_[d].capacity));
      target_[d] = take;
      rest -= take;
    }
  }

  const std::vector<Item>& items_;
  const std::vector<Device>& devices_;
  const Options& opt_;
  int D_;
  int64_t total_ = 0, cap_total_ = 0;
  std::vector<double> target_;
  std::vector<int> pipe_;
  std::vector<int32_t> dense_, free_;
  std::map<int32_t, int32_t> home_dense_;
  std::vector<int32_t> free_home_;
  std::vector<int32_t> by_size_;
  std::vector<int64_t> class_bytes_;
  std::vector<int32_t> free_class_;
};

std::string bytes_str(int64_t b) {
  char buf[64];
  std::snprintf(buf, sizeof buf, "%.2f GiB", static_cast<double>(b) / (1024.0 * 1024.0 * 1024.0));
  return buf;
}

Result finish(const Problem& pb, const std::vector<Item>& items, const std::vector<Device>& devices,
              std::vector<int32_t> assign, const std::string& strategy) {
  Result r;
  r.strategy = strategy;
  r.target = pb.target();
  std::vector<int64_t> load;
  const Score s = pb.evaluate_assignment(assign, &load);
  r.device = std::move(assign);
  r.load = load;
  r.spread = s.spread;
  r.imbalance = imbalance(load, devices);
  r.shortfall = s.overflow;
  r.feasible = s.overflow == 0;
  if (!r.feasible) {
    int64_t largest = 0;
    for (const auto& it : items) largest = std::max(largest, it.bytes);
    int64_t cap_max = 0;
    for (const auto& d : devices) cap_max = std::max(cap_max, d.capacity);
    r.message = "the parts do not fit: " + bytes_str(r.shortfall) + " over the devices' capacities";
    if (largest > cap_max) r.message += " (the largest part, " + bytes_str(largest) + ", is larger than any device)";
  }
  return r;
}

Result infeasible_total(const Problem& pb, const std::vector<Item>& items, const std::vector<Device>& devices,
                        const std::string& strategy) {
  Result r;
  r.strategy = strategy;
  r.feasible = false;
  r.shortfall = pb.total() - pb.cap_total();
  r.device.assign(items.size(), -1);
  r.load.assign(devices.size(), 0);
  r.target = pb.target();
  r.message = "the model needs " + bytes_str(pb.total()) + " but the devices offer " + bytes_str(pb.cap_total()) +
              ": short by " + bytes_str(r.shortfall);
  return r;
}

}  // namespace

double imbalance(const std::vector<int64_t>& load, const std::vector<Device>& devices) {
  bool any_acc = false;
  for (const auto& d : devices) any_acc |= !d.spill;
  double lo = std::numeric_limits<double>::infinity(), hi = -lo, sum = 0;
  int n = 0;
  for (size_t d = 0; d < load.size() && d < devices.size(); ++d) {
    if (any_acc && devices[d].spill) continue;
    const double x = static_cast<double>(load[d]);
    lo = std::min(lo, x);
    hi = std::max(hi, x);
    sum += x;
    ++n;
  }
  if (n == 0 || sum <= 0) return 0.0;
  return (hi - lo) / (sum / n);
}

Result layer_greedy(const std::vector<Item>& items, const std::vector<Device>& devices, const Options& options) {
  validate(items, devices);
  const auto t0 = std::chrono::steady_clock::now();
  Problem pb(items, devices, options);
  Result r = pb.total() > pb.cap_total() ? infeasible_total(pb, items, devices, "layer-greedy")
                                         : finish(pb, items, devices, pb.line_cut(true), "layer-greedy");
  r.evaluations = 1;
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

Result plan(const std::vector<Item>& items, const std::vector<Device>& devices, const Options& options) {
  validate(items, devices);
  if (options.window < 0 || options.max_rounds < 0)
    throw std::invalid_argument("options: window and max_rounds must be >= 0");
  const auto t0 = std::chrono::steady_clock::now();
  Problem pb(items, devices, options);
  Result r;
  if (pb.total() > pb.cap_total()) {
    r = infeasible_total(pb, items, devices, "search");
  } else {
    int64_t evals = 0;
    // Candidate 1: the baseline.
    std::vector<int32_t> base = pb.line_cut(true);
    const Score base_score = pb.evaluate_assignment(base, nullptr);
    // Candidate 2: local search over cut points, starting from the item-level line cut.
    // Pure pipelines (no experts) start from the exact min-max cut instead.
    std::vector<int> b = pb.num_free() == 0 && pb.num_dense() <= 4096 ? pb.dp_cuts() : pb.cuts_of(pb.line_cut(false));
    std::vector<int32_t> assign, best_assign;
    std::vector<int64_t> load;
    Score best = pb.fill(b, assign, load);
    best_assign = assign;
    ++evals;
    const int P = pb.num_pipe();
    // Local search: the best single cut move per round; the step grows from 1 to
    // options.window only while smaller steps find nothing.
    int rounds = 0;
    for (int w = 1; w <= options.window && rounds < options.max_rounds;) {
      Score round_best = best;
      std::vector<int> round_b;
      for (int i = 1; i < P; ++i) {
        for (int delta = -w; delta <= w; ++delta) {
          if (delta == 0) continue;
          std::vector<int> nb = b;
          nb[i] += delta;
          if (!pb.valid_cuts(nb)) continue;
          const Score s = pb.fill(nb, assign, load);
          ++evals;
          if (s.better_than(round_best)) {
            round_best = s;
            round_b = nb;
            best_assign = assign;
          }
        }
      }
      ++rounds;
      if (round_b.empty()) {
        ++w;
        continue;
      }
      b = round_b;
      best = round_best;
      w = 1;
    }
    if (base_score.better_than(best)) r = finish(pb, items, devices, std::move(base), "layer-greedy");
    else r = finish(pb, items, devices, std::move(best_assign), "search");
    r.evaluations = evals + 1;
  }
  r.seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

}  // namespace memwarden::plan
