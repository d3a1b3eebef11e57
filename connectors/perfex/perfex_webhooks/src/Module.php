<?php

declare(strict_types=1);

namespace PerfexWebhooks;

defined('BASEPATH') or exit('No direct script access allowed');

/**
 * Wiring inside Perfex: attaches a listener to every hook of the generated hook map, queues the
 * events a request produces and sends them when the request ends (a shutdown function), flushes
 * the spool on `after_cron_run`. Nothing here may break a CRM request: every entry point catches.
 */
final class Module
{
    public const NAME = 'perfex_webhooks';
    public const VERSION = '1.0.0';

    /** Options (Perfex's get_option/update_option) and their defaults. */
    public const OPTIONS = [
        'perfex_webhooks_url' => '',
        'perfex_webhooks_token' => '',
        'perfex_webhooks_events' => '', // JSON list of enabled events; empty = every event of the map
        'perfex_webhooks_timeout_ms' => '3000',
        'perfex_webhooks_batch_size' => '100',
    ];

    public const CRON_FLUSH_SECONDS = 20.0;

    private static ?Module $instance = null;
    private array $map;
    private ?Listener $listener = null;
    private ?Outbox $outbox = null;
    private bool $shutdownRegistered = false;
    /** @var array<string, true>|null */
    private ?array $enabled = null;

    public function __construct(array $map)
    {
        $this->map = $map;
    }

    public static function boot(string $mapFile): self
    {
        self::$instance = new self(require $mapFile);
        self::$instance->register();
        return self::$instance;
    }

    public static function instance(): ?self
    {
        return self::$instance;
    }

    public function map(): array
    {
        return $this->map;
    }

    public function register(): void
    {
        $hooks = [];
        $before = [];
        foreach ($this->map['events'] as $spec) {
            foreach ($spec['hooks'] as $hook) {
                $hooks[$hook] = true;
            }
            if ($spec['before'] !== null) {
                $before[$spec['before']] = true;
            }
        }
        foreach (array_keys($before) as $hook) {
            hooks()->add_action($hook, function (...$args) use ($hook): void {
                $this->guard(fn () => $this->listener()->snapshot($hook, $args));
            }, 10, 5);
        }
        foreach (array_keys($hooks) as $hook) {
            foreach ([$hook, ...(Resources::HOOK_ALIASES[$hook] ?? [])] as $fired) {
                hooks()->add_action($fired, function (...$args) use ($hook): void {
                    $this->guard(fn () => $this->onHook($hook, $args));
                }, 10, 5);
            }
        }
        hooks()->add_action('after_cron_run', function (): void {
            $this->guard(fn () => $this->outbox()->flush(self::CRON_FLUSH_SECONDS));
        });
    }

    public function onHook(string $hook, array $args): void
    {
        foreach ($this->listener()->handle($hook, $args) as $envelope) {
            if ($this->outbox()->queue($envelope) && !$this->shutdownRegistered) {
                $this->shutdownRegistered = true;
                // After the controller has answered: a CRM save does not wait for Kafka's round trip
                // beyond the transport's short timeout, and never fails because of us.
                register_shutdown_function(function (): void {
                    $this->guard(fn () => $this->outbox()->deliver());
                });
            }
        }
    }

    public function enabled(string $event): bool
    {
        if ($this->enabled === null) {
            $list = json_decode((string) get_option('perfex_webhooks_events'), true);
            $this->enabled = is_array($list) && $list !== []
                ? array_fill_keys(array_map('strval', $list), true)
                : array_fill_keys(array_keys($this->map['events']), true);
        }
        return isset($this->enabled[$event]);
    }

    public function listener(): Listener
    {
        return $this->listener ??= new Listener(
            $this->map,
            new Resources(get_instance()),
            fn (string $event): bool => $this->enabled($event)
        );
    }

    public function outbox(): Outbox
    {
        if ($this->outbox === null) {
            $transport = new Transport(
                (string) get_option('perfex_webhooks_url'),
                (string) get_option('perfex_webhooks_token'),
                max(200, (int) (get_option('perfex_webhooks_timeout_ms') ?: 3000))
            );
            $this->outbox = new Outbox(
                $this->spool(),
                $transport,
                (int) (get_option('perfex_webhooks_batch_size') ?: 100),
                static function (string $message): void {
                    log_message('error', $message);
                }
            );
        }
        return $this->outbox;
    }

    public function spool(): Spool
    {
        return new Spool(get_instance()->db, db_prefix());
    }

    /** Settings changed: build the transport and the enabled set again on next use. */
    public function reset(): void
    {
        $this->outbox = null;
        $this->listener = null;
        $this->enabled = null;
    }

    /** The settings page's button: one event straight to the pipeline, its answer returned. */
    public function sendTest(string $event): array
    {
        if (!isset($this->map['events'][$event])) {
            return ['ok' => false, 'error' => "unknown event $event"];
        }
        $envelope = Envelope::build($event, 'test', ['id' => 'test', 'perfex_webhooks_test' => '1']);
        $result = $this->outbox()->sendNow([$envelope]);
        if ($result['ok']) {
            $item = $result['results'][0] ?? [];
            $status = (int) ($item['status'] ?? 0);
            return $status >= 200 && $status < 300
                ? ['ok' => true, 'id' => $envelope['id'], 'key' => $item['key'] ?? '']
                : ['ok' => false, 'error' => (string) ($item['error'] ?? "status $status")];
        }
        return ['ok' => false, 'error' => $result['error']];
    }

    private function guard(callable $fn): void
    {
        try {
            $fn();
        } catch (\Throwable $e) {
            try {
                log_message('error', 'perfex_webhooks: ' . get_class($e) . ': ' . $e->getMessage());
            } catch (\Throwable) {
            }
        }
    }
}
