package example;

import polygate.ffi.Runtime;

/** Answers each request with its own bytes: {@code ngx.load_ffi("ffi_java", "example.Echo,init")}. */
public final class Echo {
    private Echo() {}

    /** The runtime's init: serve the queue. */
    public static int init(String cfg, long tq) {
        return Runtime.serve(tq, task -> task.request());
    }

    /** An empty answer for the ffi plugin (continue unchanged): the cheapest plugin round trip. */
    public static int initContinue(String cfg, long tq) {
        return Runtime.serve(tq, task -> null);
    }
}
