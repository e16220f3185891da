// Picks the kernel table of one ISA, once.
//
// MLMATH_FOR_EACH_ISA(X) comes from CMake and lists the compiled ISAs, worst to best; each has
// a function mlmath::<isa>::kernel_table() (kernels/kernel_table.cpp compiled for that ISA).
#include <atomic>
#include <cstdlib>
#include <mutex>
#include <stdexcept>
#include <string>
#include <vector>

#include "common/half.h"
#include "dispatch/cpu_features.h"
#include "mlmath/mlmath.h"
#include "mlmath_build_config.h"

namespace mlmath {

#define MLMATH_DECLARE_TABLE(isa) \
  namespace isa {                 \
  KernelTable kernel_table();     \
  }
MLMATH_FOR_EACH_ISA(MLMATH_DECLARE_TABLE)
#undef MLMATH_DECLARE_TABLE

namespace {

struct IsaEntry {
  const char* name;
  KernelTable (*make_table)();
};

const std::vector<IsaEntry>& compiled_entries() {
#define MLMATH_ISA_ENTRY(isa) IsaEntry{#isa, &isa::kernel_table},
  static const std::vector<IsaEntry> entries = {MLMATH_FOR_EACH_ISA(MLMATH_ISA_ENTRY)};
#undef MLMATH_ISA_ENTRY
  return entries;
}

bool cpu_runs(const std::string& isa) {
  const CpuFeatures& f = cpu_features();
  if (isa == "scalar") return true;
  if (isa == "avx2") return f.avx2_fma;
  if (isa == "avx512") return f.avx512f;
  if (isa == "neon") return f.neon;
  return false;
}

std::string join(const std::vector<std::string>& names) {
  std::string out;
  for (const std::string& n : names) out += (out.empty() ? "" : ", ") + n;
  return out;
}

std::mutex g_select_mutex;
KernelTable g_table;
std::string g_isa;
std::atomic<bool> g_selected{false};

void select_locked(const std::string& name) {
  for (const IsaEntry& e : compiled_entries()) {
    if (name == e.name) {
      if (!cpu_runs(name)) {
        throw std::invalid_argument(
            "mlmath_native: ISA '" + name +
            "' is not supported by this CPU/OS (supported: " + join(supported_isas()) + ")");
      }
      g_table = e.make_table();
      g_isa = name;
      g_selected.store(true, std::memory_order_release);
      return;
    }
  }
  throw std::invalid_argument("mlmath_native: unknown or not compiled ISA '" + name +
                              "' (compiled: " + join(compiled_isas()) +
                              "; supported here: " + join(supported_isas()) + ")");
}

void select_default_locked() {
  const char* env = std::getenv("MLMATH_NATIVE_ISA");
  if (env != nullptr && *env != '\0') {
    try {
      select_locked(env);
    } catch (const std::invalid_argument& e) {
      throw std::runtime_error(std::string("MLMATH_NATIVE_ISA: ") + e.what());
    }
    return;
  }
  select_locked(supported_isas().back());
}

}  // namespace

std::vector<std::string> compiled_isas() {
  std::vector<std::string> names;
  for (const IsaEntry& e : compiled_entries()) names.emplace_back(e.name);
  return names;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> names;
  for (const IsaEntry& e : compiled_entries())
    if (cpu_runs(e.name)) names.emplace_back(e.name);
  return names;
}

const KernelTable& kernels() {
  if (!g_selected.load(std::memory_order_acquire)) {
    std::lock_guard<std::mutex> lock(g_select_mutex);
    if (!g_selected.load(std::memory_order_relaxed)) select_default_locked();
  }
  return g_table;
}

void select_isa(const std::string& name) {
  std::lock_guard<std::mutex> lock(g_select_mutex);
  select_locked(name);
}

std::string selected_isa() {
  kernels();
  return g_isa;
}

float to_float(bf16 x) { return bf16_to_float(x); }
float to_float(f16 x) { return f16_to_float(x); }
bf16 to_bf16(float x) { return float_to_bf16(x); }
f16 to_f16(float x) { return float_to_f16(x); }

}  // namespace mlmath
