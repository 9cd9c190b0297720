/*
 * A stand-in for libascendcl.so, for tests on machines without CANN. It implements, on host
 * memory, the functions ascendcl-sys resolves (all but a few optional ones), with the signatures of acl_rt.h 1.16/1.17,
 * and checks what a real runtime would reject: calls from a thread bound to no device,
 * copies larger than their destination, waits on events never recorded or created without
 * ACL_EVENT_SYNC, registration of memory that is not 4 KiB-aligned. Copies run when they are
 * queued, so every event is complete once recorded. It proves kvpool's plumbing (symbol
 * names, argument order, lifetimes), not its behaviour on an NPU.
 *
 * Build: cc -shared -fPIC -o libascendcl.so libascendcl_stub.c
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef int aclError;

static __thread int32_t bound = -1;
static int initialised;
static int live_streams, live_events, registered, copies, waits, set_device_calls;
/* While set, recorded events read as not complete (a device still busy). */
static int hold;

static aclError on_device(void) { return bound < 0 ? 107002 /* context is null */ : 0; }

aclError aclInit(const char *config) { (void)config; return initialised++ ? 100002 : 0; }
aclError aclFinalize(void) { return 0; }
aclError aclrtSetDevice(int32_t id) { bound = id; set_device_calls++; return 0; }
aclError aclrtResetDevice(int32_t id) { (void)id; return 0; }
aclError aclrtGetDevice(int32_t *id) { if (bound < 0) return 107002; *id = bound; return 0; }
aclError aclrtGetDeviceCount(uint32_t *n) { *n = 1; return 0; }
aclError aclrtMalloc(void **p, size_t n, int policy) { (void)policy; *p = malloc(n); return 0; }
aclError aclrtFree(void *p) { free(p); return 0; }
aclError aclrtMallocHost(void **p, size_t n) { *p = malloc(n); return 0; }
aclError aclrtFreeHost(void *p) { free(p); return 0; }
aclError aclrtMemcpy(void *dst, size_t max, const void *src, size_t n, int kind) {
    (void)kind;
    if (n > max) return 100000;
    memcpy(dst, src, n);
    return 0;
}
const char *aclGetRecentErrMsg(void) { return "stub: recent error"; }

aclError aclrtCreateStream(void **s) {
    if (on_device()) return on_device();
    *s = malloc(8);
    live_streams++;
    return 0;
}
aclError aclrtSynchronizeStream(void *s) { (void)s; return on_device(); }
aclError aclrtDestroyStream(void *s) { free(s); live_streams--; return 0; }

struct event { int sync; int recorded; };
aclError aclrtCreateEventWithFlag(void **e, uint32_t flag) {
    if (on_device()) return on_device();
    struct event *ev = calloc(1, sizeof *ev);
    ev->sync = (flag & 1u) != 0;
    *e = ev;
    live_events++;
    return 0;
}
aclError aclrtDestroyEvent(void *e) { free(e); live_events--; return 0; }
aclError aclrtRecordEvent(void *e, void *stream) {
    (void)stream;
    if (on_device()) return on_device();
    ((struct event *)e)->recorded = 1;
    return 0;
}
aclError aclrtStreamWaitEvent(void *stream, void *e) {
    (void)stream;
    struct event *ev = e;
    if (on_device()) return on_device();
    if (!ev->sync || !ev->recorded) return 100000;
    waits++;
    return 0;
}
aclError aclrtQueryEventStatus(void *e, int *status) {
    if (on_device()) return on_device();
    *status = ((struct event *)e)->recorded && !hold ? 1 : 0;
    return 0;
}
aclError aclrtSynchronizeEvent(void *e) { (void)e; return on_device(); }

aclError aclrtMemcpyAsync(void *dst, size_t max, const void *src, size_t n, int kind,
                          void *stream) {
    if (on_device()) return on_device();
    if (n > max || stream == NULL || kind < 1 || kind > 2) return 100000;
    memcpy(dst, src, n);
    copies++;
    return 0;
}
aclError aclrtHostRegister(void *p, uint64_t n, int type, void **dev) {
    (void)n;
    if (on_device()) return on_device();
    if ((uintptr_t)p % 4096 != 0 || type != 0) return 100000;
    *dev = p;
    registered++;
    return 0;
}
aclError aclrtHostUnregister(void *p) { (void)p; registered--; return 0; }

/* For the tests. */
void stub_hold(int h) { hold = h; }
int stub_set_device_calls(void) { return set_device_calls; }
int stub_live_streams(void) { return live_streams; }
int stub_live_events(void) { return live_events; }
int stub_registered(void) { return registered; }
int stub_copies(void) { return copies; }
int stub_waits(void) { return waits; }
