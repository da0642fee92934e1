// Device runtimes opened with dlopen on first use: one resolved set of entry points per library path, kept for the
// life of the process, so a build needs no device SDK and an import never fails for want of one.
#pragma once
#include <dlfcn.h>

#include <mutex>
#include <string>
#include <unordered_map>

#include "copy_error.h"

namespace kvpool {

// `resolve(handle)` fills a Runtime from an open library and throws BackendUnavailable when a symbol is missing;
// `what_needs_it` completes the message when the library itself cannot be opened.
template <typename Runtime, typename Resolve>
const Runtime& load_runtime(const std::string& library, const char* what_needs_it, Resolve resolve) {
  static std::mutex mu;
  static std::unordered_map<std::string, Runtime> loaded;
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = loaded.find(library); it != loaded.end()) return it->second;
  void* handle = dlopen(library.c_str(), RTLD_NOW | RTLD_LOCAL);
  if (handle == nullptr) {
    const char* why = dlerror();
    throw BackendUnavailable("cannot load " + library + " (" + (why ? why : "unknown") + "): " + what_needs_it);
  }
  try {
    return loaded.emplace(library, resolve(handle)).first->second;
  } catch (...) {
    dlclose(handle);
    throw;
  }
}

template <typename Fn>
Fn symbol(void* handle, const char* name) {
  return reinterpret_cast<Fn>(dlsym(handle, name));
}

}  // namespace kvpool
