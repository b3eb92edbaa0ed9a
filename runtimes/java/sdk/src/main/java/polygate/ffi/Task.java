package polygate.ffi;

import java.nio.charset.StandardCharsets;

/** One request, as a handler sees it. */
public final class Task {
    private final long ptr;
    private final byte[] request;

    Task(long ptr, byte[] request) {
        this.ptr = ptr;
        this.request = request;
    }

    /** The request's bytes (empty for a nil request). */
    public byte[] request() {
        return request == null ? new byte[0] : request;
    }

    /** The request as UTF-8 text. */
    public String requestString() {
        return new String(request(), StandardCharsets.UTF_8);
    }

    /** Whether the caller is gone: the answer will be discarded, the work may stop. */
    public boolean isCancelled() {
        return Ffi.isCancelled(ptr);
    }

    /** Milliseconds the caller still waits, or -1 without a deadline. */
    public long remainingMs() {
        return Ffi.remainingMs(ptr);
    }

    long ptr() {
        return ptr;
    }
}
