package polygate.ffi;

import java.nio.charset.StandardCharsets;

/** An answer with rc != 0, thrown by a handler. */
public class FfiException extends Exception {
    private static final long serialVersionUID = 1L;
    private final int rc;

    /** rc (0 becomes 1) and the message sent as the answer's body. */
    public FfiException(int rc, String message) {
        super(message);
        this.rc = rc == 0 ? 1 : rc;
    }

    /** The rc. */
    public int rc() {
        return rc;
    }

    byte[] body() {
        String m = getMessage();
        return m == null ? null : m.getBytes(StandardCharsets.UTF_8);
    }
}
