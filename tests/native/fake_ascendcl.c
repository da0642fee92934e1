/* A stand-in for libascendcl.so with the few entry points the ACL copy backend uses, doing plain memcpy.
 * Built by the tests (an Ascend runtime cannot run here); faults are injected through environment variables:
 *   FAKE_ACL_FAIL_AT=k     the copy with index k fails with FAKE_ACL_ERROR (default 507011); the batch call sets
 *                          failIndex = k
 *   FAKE_ACL_SYNC_FAIL=1   aclrtSynchronizeStream fails with 507000
 *   FAKE_ACL_BATCH_FAIL=1  aclrtMemcpyBatchAsync fails at copy 0 (an experimental API a device may refuse)
 * Compile with -DFAKE_ACL_WITH_BATCH to export aclrtMemcpyBatchAsync (CANN 8.5+), without it to test the fallback.
 * fake_acl_calls() reports (batch calls << 32) | per-copy calls, so tests can tell which path ran. */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct { uint32_t id; uint32_t type; } aclrtMemLocation;
typedef struct { aclrtMemLocation dstLoc; aclrtMemLocation srcLoc; uint8_t rsv[16]; } aclrtMemcpyBatchAttr;

static uint64_t batch_calls, copy_calls;

static long fail_at(void) {
  const char* v = getenv("FAKE_ACL_FAIL_AT");
  return v ? atol(v) : -1;
}
static int error_code(void) {
  const char* v = getenv("FAKE_ACL_ERROR");
  return v ? atoi(v) : 507011;
}

uint64_t fake_acl_calls(void) { return (batch_calls << 32) | copy_calls; }

int aclrtMemcpyAsync(void* dst, size_t destMax, const void* src, size_t count, int kind, void* stream) {
  (void)stream;
  if (kind != 1 && kind != 2) return 100000; /* ACL_ERROR_INVALID_PARAM */
  if (count > destMax) return 100000;
  if ((long)copy_calls == fail_at()) { copy_calls++; return error_code(); }
  copy_calls++;
  memcpy(dst, src, count);
  return 0;
}

int aclrtSynchronizeStream(void* stream) {
  (void)stream;
  const char* v = getenv("FAKE_ACL_SYNC_FAIL");
  return (v && v[0] == '1') ? 507000 : 0;
}

#ifdef FAKE_ACL_WITH_BATCH
int aclrtMemcpyBatchAsync(void** dsts, size_t* destMaxs, void** srcs, size_t* sizes, size_t numBatches,
                          aclrtMemcpyBatchAttr* attrs, size_t* attrsIndexes, size_t numAttrs, size_t* failIndex,
                          void* stream) {
  (void)stream;
  batch_calls++;
  if (numAttrs != 1 || attrsIndexes[0] != 0) return 100000;
  /* host<->device only: exactly one side must be the device */
  if (attrs[0].dstLoc.type + attrs[0].srcLoc.type != 1) return 100000;
  const char* batch_fail = getenv("FAKE_ACL_BATCH_FAIL");
  if (batch_fail && batch_fail[0] == '1') { *failIndex = 0; return error_code(); }
  long k = fail_at();
  for (size_t i = 0; i < numBatches; ++i) {
    if ((long)i == k || sizes[i] > destMaxs[i]) { *failIndex = i; return error_code(); }
    memcpy(dsts[i], srcs[i], sizes[i]);
  }
  return 0;
}
#endif
