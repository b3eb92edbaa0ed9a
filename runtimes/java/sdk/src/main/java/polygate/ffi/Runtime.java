package polygate.ffi;

import java.io.PrintWriter;
import java.io.StringWriter;
import java.nio.charset.StandardCharsets;
import java.util.concurrent.CompletionException;
import java.util.concurrent.CompletionStage;
import java.util.concurrent.Executor;
import java.util.concurrent.ExecutorService;
import java.util.concurrent.Executors;
import java.util.concurrent.atomic.AtomicInteger;
import java.util.function.Consumer;

/**
 * Serves a runtime's queue. A runtime class names a static {@code int init(String cfg, long tq)}
 * in its cfg ("pkg.Class,init,rest"); the simplest one is
 *
 * <pre>
 * public static int init(String cfg, long tq) {
 *     return Runtime.serve(tq, task -&gt; task.request());
 * }
 * </pre>
 */
public final class Runtime {
    private Runtime() {}

    private static final int BATCH = 32;
    private static volatile ExecutorService shared;

    /** The default pool handlers run on: daemon threads, twice the processors (at least 4). */
    public static Executor defaultPool() {
        ExecutorService p = shared;
        if (p == null) {
            synchronized (Runtime.class) {
                if (shared == null) {
                    int n = Math.max(4, 2 * java.lang.Runtime.getRuntime().availableProcessors());
                    AtomicInteger id = new AtomicInteger();
                    shared = Executors.newFixedThreadPool(n, r -> {
                        Thread t = new Thread(r, "polygate-handler-" + id.incrementAndGet());
                        t.setDaemon(true);
                        return t;
                    });
                }
                p = shared;
            }
        }
        return p;
    }

    /** Serves {@code tq} with a handler on the {@link #defaultPool()}; returns 0 (init's rc). */
    public static int serve(long tq, Handler handler) {
        return serve(tq, handler, defaultPool());
    }

    /** Serves {@code tq} with a handler run on {@code pool}; returns 0 (init's rc). */
    public static int serve(long tq, Handler handler, Executor pool) {
        startPoller(tq, task -> pool.execute(() -> runSync(task, handler)));
        return 0;
    }

    /** Serves {@code tq} with an asynchronous handler, called on the poll thread. */
    public static int serveAsync(long tq, AsyncHandler handler) {
        startPoller(tq, task -> {
            CompletionStage<byte[]> stage;
            try {
                stage = handler.handle(task);
            } catch (Throwable e) {
                fail(task, e);
                return;
            }
            stage.whenComplete((out, err) -> {
                if (err != null) {
                    fail(task, err);
                } else {
                    Ffi.respond(task.ptr(), 0, out);
                }
            });
        });
        return 0;
    }

    private static void startPoller(long tq, Consumer<Task> dispatch) {
        Thread t = new Thread(() -> {
            long[] buf = new long[BATCH];
            while (true) {
                int n = Ffi.pollN(tq, buf);
                if (n <= 0) {
                    return; // unloaded: never touch tq again
                }
                for (int i = 0; i < n; i++) {
                    long p = buf[i];
                    dispatch.accept(new Task(p, Ffi.getReq(p)));
                }
            }
        }, "polygate-poll");
        t.setDaemon(true);
        t.start();
    }

    private static void runSync(Task task, Handler handler) {
        byte[] out;
        try {
            out = handler.handle(task);
        } catch (Throwable e) {
            fail(task, e);
            return;
        }
        Ffi.respond(task.ptr(), 0, out);
    }

    private static void fail(Task task, Throwable e) {
        Throwable cause = e;
        while (cause instanceof CompletionException && cause.getCause() != null) {
            cause = cause.getCause();
        }
        if (cause instanceof FfiException) {
            FfiException f = (FfiException) cause;
            Ffi.respond(task.ptr(), f.rc(), f.body());
            return;
        }
        StringWriter sw = new StringWriter();
        cause.printStackTrace(new PrintWriter(sw));
        Ffi.respond(task.ptr(), 1, sw.toString().getBytes(StandardCharsets.UTF_8));
    }
}
