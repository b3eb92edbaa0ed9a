package polygate.ffi;

/**
 * Answers one request: the returned bytes are the answer with rc 0 ({@code null} = no body).
 * Throw {@link FfiException} to answer another rc; any other exception answers rc 1 with its
 * stack trace.
 */
@FunctionalInterface
public interface Handler {
    /** Handles one task. */
    byte[] handle(Task task) throws Exception;
}
