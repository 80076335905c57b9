// Balanced placement of a model's parts on devices (torch-free).
//
// The model is a list of items. Pipeline items (free == false) are the dense parts
// (embeddings, attention, dense MLPs, routers and shared experts, the head) in forward
// order: they are cut into contiguous runs, one run per device in device order, the
// first item on the first device that receives anything and the last item on the last
// such device. Free items (free == true) are routed experts: each may go to any device.
//
// Each device has a capacity (memory minus its reserves). Targets are found by water
// filling: every accelerator gets the same share of the model unless its capacity is
// smaller; spill devices (CPU, disk) only take what the accelerators cannot hold, in
// device order. The planner searches pipeline cut points (a local search from the
// cumulative-target cut) and, for each, fills experts: first onto their own layer's
// device up to its target, the rest largest-first onto the device furthest below its
// target, then moves and swaps experts between the most and least loaded devices. The
// objective is lexicographic: bytes over capacity, then the spread of (load - target).
// The simple layer-granular greedy (whole layers, experts with their layer, cut at the
// cumulative targets) is always evaluated too, so the result is never worse than it.
// Deterministic: no randomness, ties broken by index.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace memwarden::plan {

struct Item {
  int64_t bytes = 0;
  int32_t layer = 0;  // experts prefer the device of the pipeline items of their layer
  bool free = false;  // true: a routed expert (placeable anywhere)
};

struct Device {
  int64_t capacity = 0;  // bytes available for weights (memory minus reserves)
  bool spill = false;    // CPU / disk: used only for what accelerators cannot hold
};

enum class Balance {
  Bytes,     // equal bytes per accelerator (water filling under capacities)
  Capacity,  // bytes proportional to each accelerator's capacity
};

struct Options {
  Balance balance = Balance::Bytes;
  bool locality = true;  // experts first onto their own layer's device
  int window = 3;        // local search moves each cut point by up to +-window items
  int max_rounds = 64;   // local search rounds (each takes the best single move)
};

struct Result {
  bool feasible = false;
  int64_t shortfall = 0;        // bytes that do not fit (0 when feasible)
  std::vector<int32_t> device;  // per item; -1 when infeasible because the total does not fit
  std::vector<int64_t> load;    // bytes per device
  std::vector<double> target;   // balanced target per device
  double imbalance = 0.0;       // (max - min) / mean of accelerator loads
  double spread = 0.0;          // max - min of (load - target) over all devices
  std::string strategy;         // "search" or "layer-greedy"
  std::string message;
  double seconds = 0.0;
  int64_t evaluations = 0;
};

// Throws std::invalid_argument on malformed input (no devices, negative sizes).
Result plan(const std::vector<Item>& items, const std::vector<Device>& devices,
            const Options& options = {});

// The baseline: whole layers (pipeline items of a layer plus its experts) cut at the
// cumulative targets, in order. Same targets and metrics as plan().
Result layer_greedy(const std::vector<Item>& items, const std::vector<Device>& devices,
                    const Options& options = {});

// (max - min) / mean over the non-spill devices (all devices if every one is spill).
double imbalance(const std::vector<int64_t>& load, const std::vector<Device>& devices);

}  // namespace memwarden::plan
