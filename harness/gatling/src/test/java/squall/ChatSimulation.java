package squall;

import static io.gatling.javaapi.core.CoreDsl.*;
import static io.gatling.javaapi.http.HttpDsl.*;

import io.gatling.javaapi.core.*;
import io.gatling.javaapi.http.*;
import java.io.IOException;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.time.Duration;
import java.util.concurrent.ThreadLocalRandom;
import java.util.concurrent.atomic.AtomicLong;
import java.util.concurrent.atomic.AtomicLongArray;
import java.util.concurrent.atomic.LongAccumulator;
import java.util.concurrent.atomic.LongAdder;

/**
 * chatstream chat load, the Gatling way: the counterpart of scenarios/bench/loadgen.yaml
 * for the load-generator comparison (scripts/loadgen-compare.sh).
 *
 * <p>Each virtual user takes one row of the feeder CSV ({@code user,token,conversation};
 * the conversation must already exist with the user as a member), connects over WebSocket
 * with its token, waits for the node's {@code hello}, then sends its share of the run's
 * messages ({@code messagesPerSecond * durationSeconds / users}), one due every
 * {@code users / messagesPerSecond} seconds from a random offset within the first
 * interval (so users do not send in lockstep), each with a unique {@code client_msg_id}
 * and a body of {@code messageBytes} bytes, and waits for the ack that names that
 * {@code client_msg_id} before the next (a virtual user is sequential: closed per user,
 * where squall is open-loop). Other frames (the {@code msg} fan-out
 * of the conversation, DELIVERED statuses) are not checked: with no message buffer
 * Gatling drops them. Then it closes.
 *
 * <p>System properties (all optional but the feeder): baseUrl (http:// or ws://, default
 * ws://127.0.0.1:31101), users (100), messagesPerSecond (total, 200), messageBytes (200),
 * durationSeconds (20), feederFile (users.csv), connectRate (users connected per second,
 * 500, squall's default), ackTimeoutSeconds (10, squall's default), resultFile (a JSON
 * file the counts are written to at the end; none by default).
 */
public class ChatSimulation extends Simulation {

  private static String prop(String key, String fallback) {
    String v = System.getProperty(key);
    return v == null || v.isBlank() ? fallback : v.trim();
  }

  private final String baseUrl =
      prop("baseUrl", "ws://127.0.0.1:31101").replaceFirst("^http", "ws").replaceAll("/+$", "");
  private final int users = Integer.parseInt(prop("users", "100"));
  private final double messagesPerSecond = Double.parseDouble(prop("messagesPerSecond", "200"));
  private final int messageBytes = Integer.parseInt(prop("messageBytes", "200"));
  private final int durationSeconds = Integer.parseInt(prop("durationSeconds", "20"));
  private final String feederFile = prop("feederFile", "users.csv");
  private final double connectRate = Double.parseDouble(prop("connectRate", "500"));
  private final int ackTimeoutSeconds = Integer.parseInt(prop("ackTimeoutSeconds", "10"));
  private final String resultFile = prop("resultFile", "");

  /** Each user's share of the total rate: one send every `intervalMs`. */
  private final double intervalMs = users / messagesPerSecond * 1000.0;
  /** Each user's share of the run's messages (rate x duration in all, as squall plans). */
  private final int messagesPerUser =
      (int) Math.max(1, Math.round(messagesPerSecond * durationSeconds / users));

  // The simulation's own counters, read in after(): exact and cheap (no log parsing).
  private static final LongAdder CONNECTED = new LongAdder();
  private static final LongAdder SENT = new LongAdder();
  private static final LongAdder ACKED = new LongAdder();
  private static final LongAdder NOT_ACKED = new LongAdder();
  private static final LongAccumulator FIRST_SEND_MS = new LongAccumulator(Math::min, Long.MAX_VALUE);
  private static final LongAccumulator LAST_ACK_MS = new LongAccumulator(Math::max, 0);
  private static final AtomicLong STARTED_MS = new AtomicLong();
  /**
   * Acks per second since STARTED_MS (one slot a second, the last one catching anything
   * later): the comparison script counts the acks of a steady window, after warm-up, as
   * it does from squall's per-second series.
   */
  private static final AtomicLongArray ACKS_PER_SECOND = new AtomicLongArray(4096);

  private static void countAck(long nowMs) {
    long second = Math.max(0, (nowMs - STARTED_MS.get()) / 1000);
    ACKS_PER_SECOND.incrementAndGet((int) Math.min(second, ACKS_PER_SECOND.length() - 1));
  }

  /** A body of exactly messageBytes ASCII bytes (no JSON escaping needed). */
  private static String body(int size) {
    String filler = "gatling measures chat delivery under load and faults ";
    StringBuilder b = new StringBuilder(size);
    while (b.length() < size) {
      b.append(filler.charAt(b.length() % filler.length()));
    }
    return b.toString();
  }

  private final String sendFrame =
      "{\"v\":1,\"type\":\"send\",\"conversation_id\":\"#{conversation}\","
          + "\"client_msg_id\":\"#{user}-#{i}\",\"body\":\""
          + body(messageBytes)
          + "\"}";

  private final HttpProtocolBuilder protocol =
      // One WebSocket per virtual user, as squall's users have; no reconnects.
      http.wsBaseUrl(baseUrl);

  private final ScenarioBuilder chat =
      scenario("chat")
          .feed(csv(feederFile).queue())
          .exec(
              ws("connect")
                  .connect("/ws?token=#{token}")
                  .await(ackTimeoutSeconds)
                  .on(
                      ws.checkTextMessage("hello")
                          .matching(substring("\"type\":\"hello\""))
                          .check(substring("\"type\":\"hello\""))))
          .exitHereIfFailed()
          .exec(
              session -> {
                CONNECTED.increment();
                return session;
              })
          // Each user's schedule: send n is due at t0 + n * interval, t0 a random point in the
          // first interval so that the users' sends spread evenly. A fixed schedule (unlike
          // Gatling's `pace`, which counts from when it wakes and so drifts later with every
          // late wake-up or slow ack) catches up after a slow ack, as far as a user that
          // waits for each ack can.
          .exec(
              session ->
                  session.set(
                      "t0",
                      System.currentTimeMillis()
                          + ThreadLocalRandom.current().nextLong(Math.max(1, Math.round(intervalMs)))))
          .repeat(messagesPerUser, "i")
          .on(
              pause(
                      session ->
                          Duration.ofMillis(
                              Math.max(
                                  0,
                                  session.getLong("t0")
                                      + Math.round(session.getInt("i") * intervalMs)
                                      - System.currentTimeMillis())))
                  .exec(
                      session -> {
                        SENT.increment();
                        FIRST_SEND_MS.accumulate(System.currentTimeMillis());
                        return session;
                      })
                  .exec(
                      ws("send")
                          .sendText(sendFrame)
                          .await(ackTimeoutSeconds)
                          .on(
                              ws.checkTextMessage("ack")
                                  // The ack's fields come in a fixed order: type, then client_msg_id.
                                  .matching(
                                      substring("\"type\":\"ack\",\"client_msg_id\":\"#{user}-#{i}\""))
                                  .check(regex("\"seq\":(\\d+)").saveAs("seq"))))
                  .exec(
                      session -> {
                        if (session.contains("seq")) {
                          ACKED.increment();
                          long now = System.currentTimeMillis();
                          LAST_ACK_MS.accumulate(now);
                          countAck(now);
                          return session.remove("seq");
                        }
                        NOT_ACKED.increment();
                        // Keep going: an ack timeout is counted, not fatal (as in squall).
                        return session.markAsSucceeded();
                      }))
          .exec(ws("close").close());

  {
    // Gatling injects nobody from a ramp shorter than a second: all at once then.
    long connectSeconds = Math.round(users / connectRate);
    setUp(
            chat.injectOpen(
                connectSeconds < 1
                    ? atOnceUsers(users)
                    : rampUsers(users).during(Duration.ofSeconds(connectSeconds))))
        .protocols(protocol);
  }

  @Override
  public void before() {
    STARTED_MS.set(System.currentTimeMillis());
    System.out.printf(
        "squall-gatling: %d users, %.1f msg/s total (%d per user, one every %.1f ms), %d-byte bodies, %d s, against %s%n",
        users, messagesPerSecond, messagesPerUser, intervalMs, messageBytes, durationSeconds, baseUrl);
  }

  @Override
  public void after() {
    long first = FIRST_SEND_MS.get() == Long.MAX_VALUE ? 0 : FIRST_SEND_MS.get();
    long last = LAST_ACK_MS.get();
    int seconds = 0;
    for (int i = 0; i < ACKS_PER_SECOND.length(); i++) {
      if (ACKS_PER_SECOND.get(i) > 0) {
        seconds = i + 1;
      }
    }
    StringBuilder perSecond = new StringBuilder("[");
    for (int i = 0; i < seconds; i++) {
      perSecond.append(i == 0 ? "" : ",").append(ACKS_PER_SECOND.get(i));
    }
    perSecond.append("]");
    String json =
        String.format(
            "{\"tool\":\"gatling\",\"users\":%d,\"connected\":%d,\"messages_per_second_target\":%s,"
                + "\"message_bytes\":%d,\"duration_s\":%d,\"sent\":%d,\"acked\":%d,\"not_acked\":%d,"
                + "\"started_ms\":%d,\"first_send_ms\":%d,\"last_ack_ms\":%d,\"acks_per_second\":%s}",
            users,
            CONNECTED.sum(),
            messagesPerSecond,
            messageBytes,
            durationSeconds,
            SENT.sum(),
            ACKED.sum(),
            NOT_ACKED.sum(),
            STARTED_MS.get(),
            first,
            last,
            perSecond);
    System.out.println("squall-gatling result: " + json);
    if (!resultFile.isEmpty()) {
      try {
        Files.writeString(Path.of(resultFile), json + "\n", StandardCharsets.UTF_8);
      } catch (IOException e) {
        System.err.println("squall-gatling: cannot write " + resultFile + ": " + e);
      }
    }
  }
}
