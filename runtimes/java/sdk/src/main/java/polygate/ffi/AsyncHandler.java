package polygate.ffi;

import java.util.concurrent.CompletionStage;

/**
 * Answers one request asynchronously: the stage's value is the answer with rc 0; a stage
 * completed exceptionally with {@link FfiException} answers its rc, any other exception rc 1.
 */
@FunctionalInterface
public interface AsyncHandler {
    /** Starts handling one task. */
    CompletionStage<byte[]> handle(Task task);
}
