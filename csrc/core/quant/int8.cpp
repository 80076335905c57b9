#include "core/quant/int8.h"

#include <stdexcept>

namespace memwarden::quant {

Granularity parse_granularity(const std::string& name) {
  if (name == "tensor") return Granularity::kTensor;
  if (name == "token") return Granularity::kToken;
  if (name == "channel") return Granularity::kChannel;
  if (name == "group") return Granularity::kGroup;
  throw std::invalid_argument("granularity must be one of 'tensor', 'token', 'channel', 'group'; got '" +
                              name + "'");
}

const char* granularity_name(Granularity granularity) {
  switch (granularity) {
    case Granularity::kTensor: return "tensor";
    case Granularity::kToken: return "token";
    case Granularity::kChannel: return "channel";
    case Granularity::kGroup: return "group";
  }
  return "unknown";
}

ScaleLayout scale_layout(Granularity granularity, int64_t rows, int64_t cols, int64_t group_size) {
  switch (granularity) {
    case Granularity::kTensor: return {0, cols > 0 ? cols : 1, 1};
    case Granularity::kToken: return {1, cols > 0 ? cols : 1, rows};
    case Granularity::kChannel: return {0, 1, cols};
    case Granularity::kGroup:
      if (group_size <= 0) {
        throw std::invalid_argument("group_size must be a positive integer for granularity 'group', got " +
                                    std::to_string(group_size));
      }
      if (cols % group_size != 0) {
        throw std::invalid_argument("group_size (" + std::to_string(group_size) +
                                    ") must divide the last dimension (" + std::to_string(cols) + ")");
      }
      return {cols / group_size, group_size, rows * (cols / group_size)};
  }
  throw std::invalid_argument("unknown granularity");
}

}  // namespace memwarden::quant
