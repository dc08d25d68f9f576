// The store's native I/O engine: a pool of POSIX threads that run whole units of a store request
// (CRC-32 per checksum block, pread/pwrite in syscalls of block_size, bounce copies for unaligned
// memory and padded tails) without touching Python. See fuyou/store/native.py for why it exists and
// what it measured; the unit semantics are those of fuyou/store/engine.py (ThreadEngine), which stays
// as the fallback when this library cannot be built.
//
// Interface (plain C, called through ctypes, which releases the GIL for each call):
//   fy_io_create(threads, bounce_bytes, crc_fn, crc_kind) -> engine
//   fy_io_submit(engine, request_id, units, n)             queue one request of n units (copied)
//   fy_io_reap(engine, out, max, timeout_ms) -> count      finished requests (blocks up to timeout)
//   fy_io_stop(engine)                                     finish queued units, join the threads
//   fy_io_free(engine)                                     stop, then release the engine
// A request is reported once, after its last unit has finished; the first failure of any of its units
// is what it reports, and its later units are skipped (no future hangs, nothing is returned as data).
//
// The CRC function is the caller's: ISA-L's crc32_gzip_refl (exported by the isal package, which fuyou
// depends on) or zlib's crc32 from libz.so.1, chosen in Python. Both compute zlib's CRC-32, so a store
// written through this engine verifies with fuyou.store.checksum and vice versa.

#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <unordered_map>
#include <vector>

#include <sys/stat.h>
#include <unistd.h>

extern "C" {

struct fy_unit {           // one contiguous range of one file (mirrors fuyou.store.native._Unit)
    int32_t fd;
    int32_t write;         // 1 = write from buf, 0 = read into buf
    int32_t direct;        // file opened with O_DIRECT: transfer whole 4 KiB multiples
    int32_t verify;        // compute (write) / check (read) CRCs
    int64_t file_offset;
    uint8_t* buf;          // caller memory (length bytes)
    int64_t length;
    int64_t block_size;    // bytes per syscall
    int64_t crc_block;     // bytes per CRC
    uint32_t* crcs;        // write: CRC per block out; read: expected CRC per block in
    uint8_t* crc_known;    // read: 1 where crcs[i] is to be checked
    int32_t index;         // the unit's index in its request (reported with an error)
    int32_t pad_;
};

struct fy_done {           // one finished request (mirrors fuyou.store.native._Done)
    int64_t request;
    int32_t kind;          // 0 ok; 1 syscall error; 2 short transfer of zero bytes; 3 file truncated; 4 CRC mismatch
    int32_t err;           // errno for kind 1
    int64_t offset;        // file offset of the failing syscall (kinds 1-3) or of the bad block (4)
    int64_t length;        // bytes of that syscall (1-3) or of the bad block (4)
    int64_t extra;         // kind 3: the file's size; kind 4: the block's index inside the unit
    int32_t unit;          // index of the failing unit in its request
    int32_t pad_;
};

}  // extern "C"

namespace {

constexpr int64_t kAlign = 4096;

typedef uint32_t (*crc_isal_t)(uint32_t, const unsigned char*, uint64_t);
typedef unsigned long (*crc_zlib_t)(unsigned long, const unsigned char*, unsigned int);

struct Request {
    int remaining = 0;
    std::atomic<bool> failed{false};
    fy_done done{};
};

struct Item {
    fy_unit unit;
    int64_t request;
};

struct Engine {
    std::mutex mu;
    std::condition_variable work_cv, done_cv;
    std::deque<Item> queue;
    std::deque<fy_done> finished;
    std::unordered_map<int64_t, Request*> requests;
    std::vector<std::thread> threads;
    bool stopping = false;
    int64_t bounce_bytes = 0;
    void* crc_fn = nullptr;
    int crc_kind = 0;  // 0 ISA-L signature, 1 zlib signature

    uint32_t crc(const uint8_t* p, int64_t n) const {
        if (crc_kind == 0) return reinterpret_cast<crc_isal_t>(crc_fn)(0, p, static_cast<uint64_t>(n));
        return static_cast<uint32_t>(reinterpret_cast<crc_zlib_t>(crc_fn)(0, p, static_cast<unsigned int>(n)));
    }
};

int64_t round_up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

// Move n bytes between buf and the file in syscalls of at most block_size; 0 on success, else fills d.
int transfer(const fy_unit& u, uint8_t* buf, int64_t n, fy_done& d) {
    int64_t pos = 0;
    while (pos < n) {
        int64_t want = std::min(u.block_size, n - pos);
        int64_t off = u.file_offset + pos;
        ssize_t got = u.write ? pwrite(u.fd, buf + pos, static_cast<size_t>(want), off)
                              : pread(u.fd, buf + pos, static_cast<size_t>(want), off);
        if (got < 0) {
            if (errno == EINTR) continue;
            d.kind = 1; d.err = errno; d.offset = off; d.length = want;
            return 1;
        }
        if (got < want) {
            if (!u.write) {
                struct stat st;
                if (fstat(u.fd, &st) == 0 && st.st_size < off + want) {
                    d.kind = 3; d.offset = off; d.length = want; d.extra = st.st_size;
                    return 1;
                }
            }
            if (got == 0) {
                d.kind = 2; d.offset = off; d.length = want;
                return 1;
            }
        }
        pos += got;
    }
    return 0;
}

// O_DIRECT needs an aligned address and a 4 KiB-multiple length: otherwise the unit goes through the
// thread's bounce buffer (padded with zeros on write).
bool needs_bounce(const fy_unit& u) {
    return u.direct && ((reinterpret_cast<uintptr_t>(u.buf) % kAlign) != 0 || round_up(u.length) != u.length);
}

int run_unit(const Engine& e, const fy_unit& u, uint8_t* bounce, fy_done& d) {
    const int64_t cb = u.crc_block, len = u.length;
    const int64_t padded = u.direct ? round_up(len) : len;
    const bool bounced = needs_bounce(u);
    if (u.write) {
        if (u.verify)
            for (int64_t i = 0, j = 0; i < len; i += cb, ++j) u.crcs[j] = e.crc(u.buf + i, std::min(cb, len - i));
        if (bounced) {
            std::memcpy(bounce, u.buf, static_cast<size_t>(len));
            std::memset(bounce + len, 0, static_cast<size_t>(padded - len));
            return transfer(u, bounce, padded, d);
        }
        return transfer(u, u.buf, padded, d);
    }
    if (bounced) {
        if (transfer(u, bounce, padded, d)) return 1;
        std::memcpy(u.buf, bounce, static_cast<size_t>(len));
    } else if (transfer(u, u.buf, padded, d)) {
        return 1;
    }
    if (u.verify) {
        for (int64_t i = 0, j = 0; i < len; i += cb, ++j) {
            int64_t n = std::min(cb, len - i);
            if (u.crc_known[j] && e.crc(u.buf + i, n) != u.crcs[j]) {
                d.kind = 4; d.offset = u.file_offset + i; d.length = n; d.extra = j;
                return 1;
            }
        }
    }
    return 0;
}

void worker(Engine* e) {
    uint8_t* bounce = nullptr;  // allocated on first need: most units go straight to caller memory
    for (;;) {
        Item it;
        Request* r;
        {
            std::unique_lock<std::mutex> lk(e->mu);
            e->work_cv.wait(lk, [e] { return e->stopping || !e->queue.empty(); });
            if (e->queue.empty()) break;  // stopping, and every queued unit has run
            it = e->queue.front();
            e->queue.pop_front();
            r = e->requests[it.request];
        }
        if (!r->failed.load(std::memory_order_acquire)) {  // a failed request skips its remaining units
            const fy_unit& u = it.unit;
            const bool need_bounce = needs_bounce(u);
            if (need_bounce && bounce == nullptr)
                bounce = static_cast<uint8_t*>(std::aligned_alloc(kAlign, static_cast<size_t>(e->bounce_bytes)));
            fy_done d{};
            if (need_bounce && bounce == nullptr) {
                d.kind = 1; d.err = ENOMEM; d.offset = u.file_offset; d.length = u.length;
            } else {
                run_unit(*e, u, bounce, d);
            }
            if (d.kind != 0) {
                d.unit = u.index;
                std::lock_guard<std::mutex> lk(e->mu);
                if (!r->failed.exchange(true)) r->done = d;
            }
        }
        std::lock_guard<std::mutex> lk(e->mu);
        if (--r->remaining == 0) {
            r->done.request = it.request;
            e->finished.push_back(r->done);
            e->requests.erase(it.request);
            delete r;
            e->done_cv.notify_all();
        }
    }
    std::free(bounce);
}

}  // namespace

extern "C" {

void* fy_io_create(int threads, int64_t bounce_bytes, void* crc_fn, int crc_kind) {
    if (threads < 1 || bounce_bytes < kAlign || bounce_bytes % kAlign || crc_fn == nullptr) return nullptr;
    auto* e = new Engine();
    e->bounce_bytes = bounce_bytes;
    e->crc_fn = crc_fn;
    e->crc_kind = crc_kind;
    try {
        for (int i = 0; i < threads; ++i) e->threads.emplace_back(worker, e);
    } catch (...) {
        {
            std::lock_guard<std::mutex> lk(e->mu);
            e->stopping = true;
        }
        e->work_cv.notify_all();
        for (auto& t : e->threads) t.join();
        delete e;
        return nullptr;
    }
    return e;
}

// Queue request `request` made of `n` units (copied; the memory they point to must stay valid until
// the request is reaped). Returns 0, or -1 when the engine is stopping or the id is in use.
int fy_io_submit(void* engine, int64_t request, const fy_unit* units, int n) {
    auto* e = static_cast<Engine*>(engine);
    std::lock_guard<std::mutex> lk(e->mu);
    if (e->stopping || e->requests.count(request)) return -1;
    if (n <= 0) {
        fy_done d{};
        d.request = request;
        e->finished.push_back(d);
        e->done_cv.notify_all();
        return 0;
    }
    auto* r = new Request();
    r->remaining = n;
    e->requests[request] = r;
    for (int i = 0; i < n; ++i) e->queue.push_back(Item{units[i], request});
    e->work_cv.notify_all();
    return 0;
}

// Copy up to `max` finished requests into `out`; waits up to timeout_ms for the first one. Returns the
// count, or -1 once the engine is stopping and nothing is left to report.
int fy_io_reap(void* engine, fy_done* out, int max, int timeout_ms) {
    auto* e = static_cast<Engine*>(engine);
    std::unique_lock<std::mutex> lk(e->mu);
    e->done_cv.wait_for(lk, std::chrono::milliseconds(timeout_ms), [e] {
        return !e->finished.empty() || (e->stopping && e->requests.empty());
    });
    if (e->finished.empty()) return (e->stopping && e->requests.empty()) ? -1 : 0;
    int k = 0;
    while (k < max && !e->finished.empty()) {
        out[k++] = e->finished.front();
        e->finished.pop_front();
    }
    return k;
}

// Stop accepting requests, let the threads finish every queued unit, join them. Finished requests
// stay reapable until fy_io_free.
void fy_io_stop(void* engine) {
    auto* e = static_cast<Engine*>(engine);
    {
        std::lock_guard<std::mutex> lk(e->mu);
        if (e->stopping && e->threads.empty()) return;
        e->stopping = true;
    }
    e->work_cv.notify_all();
    for (auto& t : e->threads) t.join();
    e->threads.clear();
    std::lock_guard<std::mutex> lk(e->mu);
    e->done_cv.notify_all();
}

void fy_io_free(void* engine) {
    auto* e = static_cast<Engine*>(engine);
    fy_io_stop(e);
    delete e;
}

}  // extern "C"
