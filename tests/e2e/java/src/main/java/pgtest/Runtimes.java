package pgtest;

import java.nio.charset.StandardCharsets;
import java.util.ArrayList;
import java.util.List;
import java.util.concurrent.CompletableFuture;
import java.util.concurrent.TimeUnit;

import polygate.ffi.Ffi;
import polygate.ffi.FfiException;
import polygate.ffi.Runtime;

/** Runtimes for tests/e2e/java_rt.rs, one init method per behaviour. */
public final class Runtimes {
    private Runtimes() {}

    private static byte[] concat(String prefix, byte[] req) {
        byte[] p = prefix.getBytes(StandardCharsets.UTF_8);
        byte[] out = new byte[p.length + req.length];
        System.arraycopy(p, 0, out, 0, p.length);
        System.arraycopy(req, 0, out, p.length, req.length);
        return out;
    }

    public static int echo(String cfg, long tq) {
        return Runtime.serve(tq, t -> t.request());
    }

    public static int tagged(String cfg, long tq) {
        return Runtime.serve(tq, t -> concat(cfg + ":", t.request()));
    }

    public static int async(String cfg, long tq) {
        return Runtime.serveAsync(tq, t -> CompletableFuture.supplyAsync(
                () -> concat("async:", t.request()),
                CompletableFuture.delayedExecutor(t.request().length % 5, TimeUnit.MILLISECONDS)));
    }

    public static int slow(String cfg, long tq) {
        return Runtime.serveAsync(tq, t -> {
            Ffi.log(1, "slow handler started " + t.requestString());
            return CompletableFuture.supplyAsync(() -> concat("slow:", t.request()),
                    CompletableFuture.delayedExecutor(500, TimeUnit.MILLISECONDS));
        });
    }

    public static int rc(String cfg, long tq) {
        return Runtime.serve(tq, t -> {
            throw new FfiException(5, "five");
        });
    }

    public static int raise(String cfg, long tq) {
        return Runtime.serve(tq, t -> {
            throw new IllegalArgumentException("bad request " + t.requestString());
        });
    }

    public static int fail(String cfg, long tq) {
        return 3;
    }

    public static int boom(String cfg, long tq) {
        throw new IllegalStateException("init exploded");
    }

    public static int task(String cfg, long tq) {
        return Runtime.serve(tq, t -> ((t.remainingMs() > 0) + " " + t.isCancelled() + " " + t.requestString())
                .getBytes(StandardCharsets.UTF_8));
    }

    private static final class Box {
        int value;
    }

    private static int read(Box b) {
        return b.value; // compiled with an implicit null check: a SIGSEGV the JVM handles
    }

    /**
     * Dereferences null in a hot loop: once JIT-compiled, each NullPointerException starts as a
     * SIGSEGV the JVM's own handler turns into the exception (polygate must leave it alone).
     */
    public static int npe(String cfg, long tq) {
        return Runtime.serve(tq, t -> {
            Box[] boxes = {new Box(), null};
            int caught = 0;
            for (int i = 0; i < 200_000; i++) {
                try {
                    read(boxes[i & 1]);
                } catch (NullPointerException e) {
                    caught++;
                }
            }
            return ("npe " + caught).getBytes(StandardCharsets.UTF_8);
        });
    }

    /** Allocates enough per call to keep the garbage collector busy. */
    public static int gc(String cfg, long tq) {
        return Runtime.serve(tq, t -> {
            List<byte[]> junk = new ArrayList<>();
            for (int i = 0; i < 200; i++) {
                junk.add(new byte[4096]);
            }
            return concat(junk.size() + ":", t.request());
        });
    }
}
