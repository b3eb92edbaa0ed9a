package polygate.ffi;

/**
 * The host's task functions, as natives registered by polygate's Java loader
 * ({@code libffi_java.so}) when the JVM starts. Task and queue handles are addresses:
 * pass only values received from the loader or from {@link #poll}.
 */
public final class Ffi {
    private Ffi() {}

    /** Waits for the next task of queue {@code tq}; 0 once the runtime was unloaded. */
    public static native long poll(long tq);

    /**
     * Waits for tasks and stores up to {@code out.length} of them (several at once under
     * polygate); returns how many, 0 once the runtime was unloaded.
     */
    public static native int pollN(long tq, long[] out);

    /** The request's bytes ({@code null} for a nil request). */
    public static native byte[] getReq(long task);

    /** Answers a task, exactly once. rc 0 = success. */
    public static native void respond(long task, int rc, byte[] data);

    /** Whether the caller is gone (timed out, disconnected): the answer will be discarded. */
    public static native boolean isCancelled(long task);

    /** Milliseconds the caller still waits, or -1 without a deadline. */
    public static native long remainingMs(long task);

    /** Writes into polygate's log. level: 0 error, 1 warn, 2 info, 3 debug. */
    public static native void log(int level, String msg);
}
