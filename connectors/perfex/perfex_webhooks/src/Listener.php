<?php

declare(strict_types=1);

namespace PerfexWebhooks;

defined('BASEPATH') or exit('No direct script access allowed');

/**
 * Turns one Perfex action hook into the change events the hook map assigns to it.
 *
 * `before` hooks (`before_invoice_deleted`, `before_update_note`) snapshot the record; the matching
 * after hook then sends the snapshot as `data` when the record is gone (deletes) or the changed
 * fields' old values as `previous` when it is still there (updates).
 */
final class Listener
{
    /** @var array<string, array{resource: string, hooks: list<string>, before: ?string, where: array<string, string>, changed: ?string}> */
    private array $events;
    /** @var array<string, list<string>> hook => events it sends */
    private array $byHook = [];
    /** @var array<string, list<string>> before-hook => events it snapshots for */
    private array $byBefore = [];
    /** @var array<string, array> "resource:id" => the record before the change */
    private array $snapshots = [];
    private Resources $resources;
    /** @var callable(string): bool */
    private $enabled;

    public function __construct(array $map, Resources $resources, callable $enabled)
    {
        $this->events = $map['events'];
        $this->resources = $resources;
        $this->enabled = $enabled;
        foreach ($this->events as $event => $spec) {
            foreach ($spec['hooks'] as $hook) {
                $this->byHook[$hook][] = $event;
            }
            if ($spec['before'] !== null) {
                $this->byBefore[$spec['before']][] = $event;
            }
        }
    }

    /** @return list<string> every hook a listener is attached to */
    public function hooks(): array
    {
        return array_keys($this->byHook);
    }

    /** @return list<string> */
    public function beforeHooks(): array
    {
        return array_keys($this->byBefore);
    }

    /** A before-hook fired: keep the record as it is now, for the after hook. */
    public function snapshot(string $hook, array $args): void
    {
        foreach ($this->byBefore[$hook] ?? [] as $event) {
            if (!($this->enabled)($event)) {
                continue;
            }
            $subject = Resources::HOOK_SUBJECT[$hook] ?? $this->events[$event]['resource'];
            $id = Resources::idFrom($subject, $args);
            if ($id !== null && !isset($this->snapshots["$subject:$id"])) {
                $record = $this->resources->load($subject, $id);
                if ($record !== null) {
                    $this->snapshots["$subject:$id"] = $record;
                }
            }
        }
    }

    /**
     * The envelopes one hook call produces (none when its events are disabled or conditions fail).
     *
     * @return list<array>
     */
    public function handle(string $hook, array $args): array
    {
        $out = [];
        $loaded = [];
        $load = function (string $resource, string $id) use (&$loaded): ?array {
            $key = "$resource:$id";
            if (!array_key_exists($key, $loaded)) {
                $loaded[$key] = $this->resources->load($resource, $id);
            }
            return $loaded[$key];
        };
        foreach ($this->byHook[$hook] ?? [] as $event) {
            if (!($this->enabled)($event)) {
                continue;
            }
            $spec = $this->events[$event];
            $resource = $spec['resource'];
            $subject = Resources::HOOK_SUBJECT[$hook] ?? $resource;
            $subjectRecord = null;
            $id = null;
            if ($subject === $resource) {
                $id = Resources::idFrom($resource, $args);
                if ($id === null && $resource === 'staff' && $args === [] && function_exists('get_staff_user_id')) {
                    $id = (string) get_staff_user_id(); // after_staff_login passes nothing: the one who logged in
                }
            } else {
                $subjectId = Resources::idFrom($subject, $args);
                if ($subjectId !== null) {
                    $subjectRecord = $load($subject, $subjectId) ?? ($this->snapshots["$subject:$subjectId"] ?? null);
                    $field = Resources::PARENT[$subject][$resource] ?? null;
                    $parent = $field === null ? null : ($subjectRecord[$field] ?? Resources::argField($field, $args));
                    $id = is_scalar($parent) && (string) $parent !== '' ? (string) $parent : null;
                }
            }
            if ($id === null || $id === '0') {
                continue; // nothing to say which record changed: not an event we can send
            }
            $data = $load($resource, $id);
            $before = $this->snapshots["$resource:$id"] ?? null;
            $previous = null;
            if ($data === null) {
                // Gone: the snapshot, else the record the hook handed over (task_timer_deleted passes
                // the deleted timer), else at least its id.
                $data = $before ?? self::recordInArgs($resource, $id, $args) ?? ['id' => $id];
            } elseif ($before !== null) {
                $previous = Envelope::changed($before, $data);
            }
            if (!$this->matches($spec['where'], $args, $subjectRecord, $data)) {
                continue;
            }
            $previous = self::previousFromHook($hook, $args, $data) ?? $previous;
            if ($spec['changed'] !== null && !array_key_exists($spec['changed'], $previous ?? [])) {
                continue; // derived from a change of that field, and it did not change
            }
            $out[] = Envelope::build($event, $id, $data, $previous);
        }
        return $out;
    }

    /** The hook's first argument when it is the record itself (an array or object with its id). */
    private static function recordInArgs(string $resource, string $id, array $args): ?array
    {
        $arg = $args[0] ?? null;
        if (is_object($arg)) {
            $arg = get_object_vars($arg);
        }
        return is_array($arg) && isset($arg['id']) && (string) $arg['id'] === $id && Resources::idFrom($resource, $args) === $id
            ? $arg
            : null;
    }

    private function matches(array $where, array $args, ?array $subjectRecord, array $data): bool
    {
        foreach ($where as $field => $want) {
            $value = Resources::argField($field, $args) ?? ($subjectRecord[$field] ?? null) ?? ($data[$field] ?? null);
            if ($value === null || (string) $value !== (string) $want) {
                return false;
            }
        }
        return true;
    }

    /** Hooks that hand over the old state themselves. */
    private static function previousFromHook(string $hook, array $args, array $data): ?array
    {
        $arg = $args[0] ?? null;
        if (is_object($arg)) {
            $arg = get_object_vars($arg);
        }
        if (!is_array($arg)) {
            return null;
        }
        if ($hook === 'lead_status_changed' && isset($arg['old_status'])) {
            return ['status' => $arg['old_status']];
        }
        if ($hook === 'ticket_settings_updated' && isset($arg['original_ticket'])) {
            $original = $arg['original_ticket'];
            return Envelope::changed(is_object($original) ? get_object_vars($original) : (array) $original, $data);
        }
        return null;
    }
}
